"""Item XML (``format=xml``): an object's document as XNAT 1.8's ``SAXWriter`` writes it.

What is copied (docs/xnat-verified.md, "Item XML"):

* the declaration ``<?xml version="1.0" encoding="UTF-8" standalone="yes"?>``,
  then one element, comment or end tag per line, unindented, and a final newline
  (the JDK's own serializer with ``indent=yes`` and no indent amount);
* the root is named after the schema element (``xnat:MRSession``, ``xnat:Subject``),
  carries the item's attributes (its base type's first), then every schema
  prefix XNAT registers in ``Hashtable`` order, ``xmlns:xsi`` and
  ``xsi:schemaLocation`` (``namespace <site>/schemas/<file>.xsd`` pairs);
* children in the schema's order, a base type's before its extension's; a
  child whose type is not the declared one says ``xsi:type`` after its other
  attributes; items whose tables have hidden keys carry a
  ``<!--hidden_fields[...]-->`` comment first;
* a subject nests its experiments, a session its sharing, resources, scans
  (with their ``xnat:file`` resources) and assessors (with ``out/file``).

Hidden numeric keys come from the store's row ids. No ``insert_date`` or
``insert_user``: the schema has no such elements.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field

from ..metadata import DEMOGRAPHICS
from ..store import Store
from .files import ARCHIVE_ROOT, catalog_path
from .resolve import Resolved

XSI = "http://www.w3.org/2001/XMLSchema-instance"
# XFTMetaManager's prefix map is a java.util.Hashtable; this is its key order
# for the ten schemas of a stock XNAT (computed with the JDK, and the order
# real documents show).
PREFIXES = (("arc", "http://nrg.wustl.edu/arc"), ("val", "http://nrg.wustl.edu/val"),
            ("pipe", "http://nrg.wustl.edu/pipe"), ("wrk", "http://nrg.wustl.edu/workflow"),
            ("scr", "http://nrg.wustl.edu/scr"), ("xdat", "http://nrg.wustl.edu/security"),
            ("cat", "http://nrg.wustl.edu/catalog"), ("prov", "http://www.nbirn.net/prov"),
            ("xnat", "http://nrg.wustl.edu/xnat"),
            ("xnat_a", "http://nrg.wustl.edu/xnat_assessments"))
# XFTManager's data models (a Hashtable keyed by file name), in the order
# real 1.7/1.8 documents list them.
SCHEMA_FILES = (("http://nrg.wustl.edu/workflow", "workflow.xsd"),
                ("http://nrg.wustl.edu/catalog", "catalog.xsd"),
                ("http://nrg.wustl.edu/pipe", "repository.xsd"),
                ("http://nrg.wustl.edu/scr", "screeningAssessment.xsd"),
                ("http://nrg.wustl.edu/arc", "project.xsd"),
                ("http://nrg.wustl.edu/val", "protocolValidation.xsd"),
                ("http://nrg.wustl.edu/xnat", "xnat.xsd"),
                ("http://nrg.wustl.edu/xnat_assessments", "assessments.xsd"),
                ("http://www.nbirn.net/prov", "birnprov.xsd"),
                ("http://nrg.wustl.edu/security", "security.xsd"))
# The schema's root element for each type (xnat.xsd's top-level xs:element).
ROOT_NAMES = {"xnat:projectData": "xnat:Project", "xnat:subjectData": "xnat:Subject",
              "xnat:mrSessionData": "xnat:MRSession", "xnat:ctSessionData": "xnat:CTSession",
              "xnat:petSessionData": "xnat:PETSession",
              "xnat:petmrSessionData": "xnat:PETMRSession",
              "xnat:crSessionData": "xnat:CRSession", "xnat:dxSessionData": "xnat:DXSession",
              "xnat:usSessionData": "xnat:USSession", "xnat:nmSessionData": "xnat:NMSession",
              "xnat:otherDicomSessionData": "xnat:OtherDicomSession",
              "xnat:mrScanData": "xnat:MRScan", "xnat:ctScanData": "xnat:CTScan",
              "xnat:petScanData": "xnat:PETScan", "xnat:crScanData": "xnat:CRScan",
              "xnat:dxScanData": "xnat:DXScan", "xnat:usScanData": "xnat:USScan",
              "xnat:nmScanData": "xnat:NMScan", "xnat:scScanData": "xnat:SCScan",
              "xnat:otherDicomScanData": "xnat:OtherDicomScan",
              "xnat:qcAssessmentData": "xnat:QCAssessment",
              "xnat:qcManualAssessorData": "xnat:QCManualAssessment",
              "xnat:resourceCatalog": "xnat:ResourceCatalog"}


@dataclass
class Node:
    """One element: attributes in writing order, then text or children."""
    name: str
    attrs: list[tuple[str, str]] = field(default_factory=list)
    text: str | None = None
    children: list[Node | str] = field(default_factory=list)  # str = a comment

    def attr(self, name: str, value: object) -> Node:
        if value not in (None, ""):
            self.attrs.append((name, str(value)))
        return self

    def leaf(self, name: str, value: object) -> Node:
        """A simple child element, left out when it has no value."""
        if value not in (None, ""):
            self.children.append(Node(name, text=str(value)))
        return self

    def add(self, child: Node | None) -> Node:
        if child is not None:
            self.children.append(child)
        return self

    def group(self, name: str, items: list[Node]) -> Node:
        """A wrapper element (``xnat:scans``) around repeated children, if any."""
        if items:
            self.children.append(Node(name, children=list(items)))
        return self


def _text(value: str) -> str:
    return (value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace("\r", "&#13;"))


def _attr(value: str) -> str:
    return (_text(value).replace('"', "&quot;").replace("\n", "&#10;")
            .replace("\t", "&#9;"))


def _write(node: Node, out: list[str]) -> None:
    attrs = "".join(f' {k}="{_attr(v)}"' for k, v in node.attrs)
    if node.text is not None:
        out.append(f"<{node.name}{attrs}>{_text(node.text)}</{node.name}>")
    elif not node.children:
        out.append(f"<{node.name}{attrs}/>")
    else:
        out.append(f"<{node.name}{attrs}>")
        for child in node.children:
            if isinstance(child, str):
                out.append(f"<!--{child}-->")
            else:
                _write(child, out)
        out.append(f"</{node.name}>")


def serialize(root: Node, site_url: str) -> str:
    """The whole document: declaration, root with the namespace attributes, a
    line per element, a final newline."""
    root.attrs.extend((f"xmlns:{prefix}", uri) for prefix, uri in PREFIXES)
    root.attrs.append(("xmlns:xsi", XSI))
    root.attrs.append(("xsi:schemaLocation", " ".join(
        f"{ns} {site_url}/schemas/{name}" for ns, name in SCHEMA_FILES)))
    out = ['<?xml version="1.0" encoding="UTF-8" standalone="yes"?>']
    _write(root, out)
    return "\n".join(out) + "\n"


def _hidden(*fields: tuple[str, object]) -> str:
    """SAXWriter's comment: ``hidden_fields[key="value",...]`` (null prints ``null``)."""
    return "hidden_fields[" + ",".join(
        f'{k}="{"null" if v is None else v}"' for k, v in fields) + "]"


# ------------------------------------------------------------------ items
def project_node(store: Store, p: sqlite3.Row) -> Node:
    node = Node(ROOT_NAMES["xnat:projectData"]).attr("ID", p["id"]).attr(
        "secondary_ID", p["secondary_id"])
    node.leaf("xnat:name", p["name"]).leaf("xnat:description", p["description"])
    if p["pi_firstname"] or p["pi_lastname"]:
        rowid = store.aggregate("SELECT rowid AS n FROM projects WHERE id = ?", (p["id"],))["n"]
        pi = Node("xnat:PI", children=[_hidden(("xnat_investigatorData_id", rowid))])
        pi.leaf("xnat:firstname", p["pi_firstname"]).leaf("xnat:lastname", p["pi_lastname"])
        node.add(pi)
    node.group("xnat:resources", [resource_node(store, r, None, "xnat:resource")
                                  for r in store.owned_resources("project", p["id"])])
    return node


def subject_node(store: Store, s: sqlite3.Row, name: str | None = None) -> Node:
    """``xnat:subjectData``: sharing, demographics, then every experiment in full."""
    node = Node(name or ROOT_NAMES["xnat:subjectData"])
    node.attr("ID", s["id"]).attr("project", s["project"]).attr("group", s["subject_group"])
    node.attr("label", s["label"]).attr("src", s["src"])
    shares = [Node("xnat:share", children=[_hidden(("xnat_projectParticipant_id", r["n"]))])
              .attr("label", r["label"]).attr("project", r["project"]).attr("subject_ID", s["id"])
              for r in store.query("SELECT rowid AS n, project, label FROM shares"
                                   " WHERE kind = 'subject' AND id = ? ORDER BY project",
                                   (s["id"],))]
    node.group("xnat:sharing", shares)
    node.group("xnat:resources", [resource_node(store, r, None, "xnat:resource")
                                  for r in store.owned_resources("subject", s["id"])])
    if any(s[f.column] for f in DEMOGRAPHICS):
        rowid = store.aggregate("SELECT rowid AS n FROM subjects WHERE id = ?", (s["id"],))["n"]
        demo = Node("xnat:demographics").attr("xsi:type", "xnat:demographicData")
        demo.children.append(_hidden(("xnat_abstractDemographicData_id", rowid)))
        for f in DEMOGRAPHICS:
            value = s[f.column]
            demo.leaf(f"xnat:{f.shortcut}",
                      _java_double(value) if f.kind in ("double", "float") else value)
        node.add(demo)
    node.group("xnat:fields", _field_nodes(store, "subject", s["id"]))
    experiments = store.query("SELECT * FROM experiments WHERE subject_id = ? ORDER BY id",
                              (s["id"],))
    node.group("xnat:experiments", [experiment_node(store, e, "xnat:experiment")
                                    for e in experiments])
    return node


def experiment_node(store: Store, e: sqlite3.Row, name: str | None = None) -> Node:
    """An image session: experimentData's fields, subjectAssessorData's, imageSessionData's
    (scanner, prearchive path, scans, assessors), then the modality's own."""
    xsi_type = e["xsi_type"]
    node = Node(name or ROOT_NAMES.get(xsi_type, xsi_type))
    node.attr("ID", e["id"]).attr("project", e["project"]).attr("label", e["label"])
    node.attr("session_type", e["session_type"]).attr("modality", e["modality"]).attr(
        "UID", e["uid"])
    if name is not None:  # a nested experiment, declared xnat:subjectAssessorData
        node.attr("xsi:type", xsi_type)
    # experimentData
    shares = [Node("xnat:share", children=[_hidden(("xnat_experimentData_share_id", r["n"]),
                                                   ("sharing_share_xnat_experimentDa_id",
                                                    e["id"]))])
              .attr("label", r["label"]).attr("project", r["project"])
              for r in store.query("SELECT rowid AS n, project, label FROM shares"
                                   " WHERE kind = 'experiment' AND id = ? ORDER BY project",
                                   (e["id"],))]
    node.group("xnat:sharing", shares)
    node.leaf("xnat:date", e["date"]).leaf("xnat:time", e["time"]).leaf("xnat:note", e["note"])
    node.group("xnat:resources", [resource_node(store, r, e, "xnat:resource")
                                  for r in store.resources(e["id"], None)])
    node.group("xnat:fields", _field_nodes(store, "experiment", e["id"]))
    node.leaf("xnat:visit_id", e["visit_id"]).leaf("xnat:visit", e["visit"])
    # subjectAssessorData
    node.leaf("xnat:subject_ID", e["subject_id"])
    # imageSessionData
    if e["scanner"] or e["scanner_manufacturer"] or e["scanner_model"]:
        scanner = Node("xnat:scanner", text=e["scanner"] if e["scanner"] else None)
        node.add(scanner.attr("manufacturer", e["scanner_manufacturer"])
                 .attr("model", e["scanner_model"]))
    node.leaf("xnat:operator", e["operator"])
    node.group("xnat:scans", [scan_node(store, s, e, "xnat:scan") for s in store.scans(e["id"])])
    node.group("xnat:assessors", [assessor_node(store, a, e, "xnat:assessor")
                                  for a in store.assessors(e["id"])])
    # the modality's own
    if xsi_type in ("xnat:mrSessionData", "xnat:petmrSessionData"):
        node.leaf("xnat:fieldStrength", _java_double(e["field_strength"]))
    return node


def _field_nodes(store: Store, kind: str, owner_id: str) -> list[Node]:
    """Custom variables: ``<xnat:field name="N">value</xnat:field>``."""
    return [Node("xnat:field", text=f["value"] or None).attr("name", f["name"])
            for f in store.custom_fields(kind, owner_id)]


def _java_double(value: str) -> str:
    try:
        return repr(float(value)) if value else ""
    except ValueError:
        return value


def scan_node(store: Store, s: sqlite3.Row, e: sqlite3.Row, name: str | None = None) -> Node:
    """``xnat:imageScanData``: its fields in the schema's order, its resources as
    ``xnat:file``."""
    xsi_type = s["xsi_type"]
    node = Node(name or ROOT_NAMES.get(xsi_type, xsi_type))
    node.attr("ID", s["scan_id"]).attr("type", s["type"]).attr("UID", s["uid"]).attr(
        "project", e["project"])
    if name is not None and xsi_type != "xnat:imageScanData":
        node.attr("xsi:type", xsi_type)
    node.children.append(_hidden(("xnat_imageScanData_id", s["pk"])))
    node.leaf("xnat:image_session_ID", e["id"]).leaf("xnat:note", s["note"])
    node.leaf("xnat:quality", s["quality"]).leaf("xnat:series_description",
                                                 s["series_description"])
    node.leaf("xnat:modality", s["modality"]).leaf("xnat:frames", s["frames"])
    for r in store.resources(e["id"], s["pk"]):
        node.add(resource_node(store, r, e, "xnat:file", scan=s))
    return node


def assessor_node(store: Store, a: sqlite3.Row, e: sqlite3.Row,
                  name: str | None = None) -> Node:
    """``xnat:imageAssessorData``: experimentData's fields, ``out/file``, the session's ID."""
    xsi_type = a["xsi_type"]
    node = Node(name or ROOT_NAMES.get(xsi_type, xsi_type))
    node.attr("ID", a["id"]).attr("project", e["project"]).attr("label", a["label"])
    if name is not None and xsi_type != "xnat:imageAssessorData":
        node.attr("xsi:type", xsi_type)
    node.leaf("xnat:date", a["date"])
    node.group("xnat:out", [resource_node(store, r, e, "xnat:file", assessor=a)
                            for r in store.resources(e["id"], None, assessor_id=a["id"])])
    node.leaf("xnat:imageSession_ID", e["id"])
    return node


def resource_node(store: Store, r: sqlite3.Row, e: sqlite3.Row | None, name: str, *,
                  scan: sqlite3.Row | None = None, assessor: sqlite3.Row | None = None) -> Node:
    """A resource catalog: abstractResource's attributes, then resource's, then
    ``xsi:type``; its URI is the catalog file's place in XNAT's archive layout."""
    count, size = store.resource_totals(r["id"])
    if e is None:  # a project's or subject's own
        uri = catalog_path(store, None, r)
    else:
        if scan is not None:
            owner = f"SCANS/{scan['scan_id']}"
        elif assessor is not None:
            owner = f"ASSESSORS/{assessor['label']}"
        else:
            owner = "RESOURCES"
        uri = (f"{ARCHIVE_ROOT}/{e['project']}/arc001/{e['label']}/{owner}/{r['label']}/"
               f"{r['label']}_catalog.xml")
    node = Node(name).attr("label", r["label"]).attr("file_count", count).attr(
        "file_size", size)
    node.attr("URI", uri).attr("format", r["format"]).attr("content", r["content"])
    node.attr("xsi:type", "xnat:resourceCatalog")
    node.children.append(_hidden(("xnat_abstractResource_id", r["id"]),
                                 ("xnat_imageScanData_xnat_imagescandata_id",
                                  scan["pk"] if scan is not None else None)))
    return node


def document(store: Store, kind: str, res: Resolved, site_url: str) -> str:
    """``format=xml`` for the object a resolved path names (its ``kind``:
    project, subject, experiment, assessor or scan)."""
    node = _NODES[kind](store, res)
    return serialize(node, site_url)


_NODES: dict[str, Callable[[Store, Resolved], Node]] = {
    "project": lambda store, res: project_node(store, res.the_project),
    "subject": lambda store, res: subject_node(store, res.the_subject),
    "experiment": lambda store, res: experiment_node(store, res.the_experiment),
    "assessor": lambda store, res: assessor_node(store, res.the_assessor, res.the_experiment),
    "scan": lambda store, res: scan_node(store, res.the_scan, res.the_experiment),
}
