"""Item XML (``format=xml``): the documents XNAT 1.8's SAXWriter writes.

The rules come from XNAT's source (docs/xnat-verified.md, "Item XML"); the
outline is compared with the recorded pyxnat session document where it can be.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.testing.recorded import load, xml_outline
from xnatfs.testing.archive import itemxml
from xnatfs.testing.harness import TestServer, share_session

XNAT = "{http://nrg.wustl.edu/xnat}"
XSI_TYPE = "{http://www.w3.org/2001/XMLSchema-instance}type"
SCHEMA = Path(__file__).parents[2] / "xnatfs" / "testing" / "schemas" / "xnat.xsd"


@pytest.fixture(scope="module")
def http(demo_server: TestServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=demo_server.url, auth=("admin", "admin"), timeout=60) as client:
        yield client


def get_xml(http: httpx.Client, path: str) -> str:
    answer = http.get(path, params={"format": "xml"})
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/xml")
    return answer.text


def experiment_ids(http: httpx.Client) -> dict[str, str]:
    """xsi type → the first experiment of that type in the demo data."""
    rows = http.get("/data/experiments", params={"format": "json"}).json()["ResultSet"]["Result"]
    found: dict[str, str] = {}
    for row in rows:
        found.setdefault(row["xsiType"], row["ID"])
    return found


def test_document_layout(http: httpx.Client) -> None:
    """Declaration, then one element, comment or end tag per line, unindented,
    ending in a newline (the JDK serializer with indent=yes, no indent amount)."""
    text = get_xml(http, "/data/experiments/XNAT_E00002")
    lines = text.split("\n")
    assert lines[0] == '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
    assert text.endswith("</xnat:MRSession>\n")
    for line in lines[1:-1]:
        assert line.startswith("<") and line.endswith(">"), line
        assert not line.startswith(" ")
        # at most one element per line: a start tag, an end tag, both around text, or empty
        assert re.fullmatch(r"<!--.*-->|</[\w:]+>|<[\w:]+[^<>]*/?>(?:[^<>]*</[\w:]+>)?", line), line


@pytest.mark.parametrize("xsi_type,root", [
    ("xnat:mrSessionData", "MRSession"), ("xnat:ctSessionData", "CTSession"),
    ("xnat:petSessionData", "PETSession")])
def test_session_roots_are_schema_elements(http: httpx.Client, xsi_type: str,
                                           root: str) -> None:
    text = get_xml(http, f"/data/experiments/{experiment_ids(http)[xsi_type]}")
    assert ET.fromstring(text).tag == f"{XNAT}{root}"
    start = text.split("\n")[1]
    names = re.findall(r' ([\w:]+)="', start)
    # the item's attributes first (base type's first), then the prefixes, xsi, schemaLocation
    assert names[:3] == ["ID", "project", "label"]
    assert names[names.index("xmlns:arc"):] == [
        *(f"xmlns:{p}" for p, _ in itemxml.PREFIXES), "xmlns:xsi", "xsi:schemaLocation"]
    assert "insert_date" not in text and "insert_user" not in text


def test_schema_location_pairs_each_namespace_with_the_site_schema(
        http: httpx.Client, demo_server: TestServer) -> None:
    root = ET.fromstring(get_xml(http, "/data/experiments/XNAT_E00002"))
    words = root.attrib["{http://www.w3.org/2001/XMLSchema-instance}schemaLocation"].split(" ")
    pairs = dict(zip(words[::2], words[1::2]))
    assert list(pairs)[:3] == ["http://nrg.wustl.edu/workflow", "http://nrg.wustl.edu/catalog",
                               "http://nrg.wustl.edu/pipe"]
    assert pairs["http://nrg.wustl.edu/xnat"] == f"{demo_server.url}/schemas/xnat.xsd"
    assert set(pairs) == {uri for _, uri in itemxml.PREFIXES}


def test_outline_matches_the_recorded_session(http: httpx.Client) -> None:
    """The recorded (trimmed) pyxnat document: same root, and its children come
    in the same relative order in ours."""
    recorded = xml_outline(load("experiment-xml__pyxnat-sessxml.http").body)
    ours = xml_outline(get_xml(http, "/data/experiments/XNAT_E00002").encode())
    assert ours["root"] == recorded["root"]
    assert set(recorded["namespaces"]) <= set(ours["namespaces"])
    common = [c for c in recorded["children"] if c in ours["children"]]
    assert len(common) >= 3  # date, time, scanner, fieldStrength
    assert common == [c for c in ours["children"] if c in common]


def test_session_nests_scans_files_resources_assessors(http: httpx.Client) -> None:
    root = ET.fromstring(get_xml(http, "/data/experiments/XNAT_E00002"))
    children = [c.tag.removeprefix(XNAT) for c in root]
    assert children == ["date", "time", "resources", "fields", "visit_id", "visit",
                        "subject_ID", "scanner", "scans", "assessors", "fieldStrength"]
    scan = root.find(f"{XNAT}scans/{XNAT}scan")
    assert scan is not None and scan.attrib[XSI_TYPE] == "xnat:mrScanData"
    files = scan.findall(f"{XNAT}file")
    assert files and all(f.attrib[XSI_TYPE] == "xnat:resourceCatalog" for f in files)
    assert files[0].attrib["URI"].endswith(f"/SCANS/{scan.attrib['ID']}/DICOM/DICOM_catalog.xml")
    assessor = root.find(f"{XNAT}assessors/{XNAT}assessor")
    assert assessor is not None and assessor.attrib[XSI_TYPE] == "xnat:qcAssessmentData"
    assert assessor.find(f"{XNAT}out/{XNAT}file") is not None
    resource = root.find(f"{XNAT}resources/{XNAT}resource")
    assert resource is not None and resource.attrib["label"] == "QC"
    text = get_xml(http, "/data/experiments/XNAT_E00002")
    assert re.search(r'<xnat:scan ID="1"[^>]*>\n<!--hidden_fields\[xnat_imageScanData_id="\d+"\]-->',
                     text)
    assert '",xnat_imageScanData_xnat_imagescandata_id="null"]-->' in text


def test_attribute_order_base_type_first(http: httpx.Client) -> None:
    text = get_xml(http, "/data/experiments/XNAT_E00002")
    scan_tag = re.search(r"<xnat:scan [^>]*>", text)
    assert scan_tag is not None
    assert re.findall(r' ([\w:]+)="', scan_tag.group(0)) == ["ID", "type", "UID", "project",
                                                             "xsi:type"]
    file_tag = re.search(r"<xnat:file [^>]*>", text)
    assert file_tag is not None
    assert re.findall(r' ([\w:]+)="', file_tag.group(0)) == [
        "label", "file_count", "file_size", "URI", "format", "content", "xsi:type"]


def test_subject_project_scan_and_assessor_documents(http: httpx.Client) -> None:
    subject = ET.fromstring(get_xml(http, "/data/projects/NEURO_PUB/subjects/NP001"))
    assert subject.tag == f"{XNAT}Subject"
    experiments = subject.findall(f"{XNAT}experiments/{XNAT}experiment")
    assert [e.attrib[XSI_TYPE] for e in experiments] == ["xnat:mrSessionData"] * 2
    assert experiments[0].find(f"{XNAT}scans/{XNAT}scan") is not None
    project = ET.fromstring(get_xml(http, "/data/projects/NEURO_PUB"))
    assert project.tag == f"{XNAT}Project" and project.attrib["ID"] == "NEURO_PUB"
    scan = ET.fromstring(get_xml(http, "/data/experiments/XNAT_E00002/scans/2"))
    assert scan.tag == f"{XNAT}MRScan" and XSI_TYPE not in scan.attrib
    assert [f.attrib["label"] for f in scan.findall(f"{XNAT}file")] == [
        "DICOM", "SNAPSHOTS", "NIFTI"]
    assessor = ET.fromstring(get_xml(http, "/data/experiments/XNAT_E00003"))
    assert assessor.tag == f"{XNAT}QCAssessment"


def test_sharing_is_listed(started_demo_server: TestServer) -> None:
    server = started_demo_server
    share_session(server, "NEURO_PUB", "NP001", "NP001_MR1", into="ALICE_LAB",
                  subject_label="AL_S", session_label="AL_SHARED")
    with httpx.Client(base_url=server.url, auth=("admin", "admin")) as http:
        root = ET.fromstring(get_xml(http, "/data/experiments/XNAT_E00001"))
    shares = root.findall(f"{XNAT}sharing/{XNAT}share")
    assert [(s.attrib["project"], s.attrib["label"]) for s in shares] == [
        ("ALICE_LAB", "AL_SHARED")]
    assert [c.tag for c in root][0] == f"{XNAT}sharing"


def test_documents_validate_against_the_served_schema(http: httpx.Client) -> None:
    import xmlschema  # a test dependency (pyproject.toml)
    schema = xmlschema.XMLSchema(str(SCHEMA), validation="lax")
    paths = [f"/data/experiments/{e}" for e in experiment_ids(http).values()]
    paths += ["/data/projects/NEURO_PUB", "/data/projects/NEURO_PUB/subjects/NP001",
              "/data/experiments/XNAT_E00002/scans/2"]
    for path in paths:
        errors = list(schema.iter_errors(get_xml(http, path)))
        assert not errors, (path, [str(e).splitlines()[0] for e in errors[:3]])


def test_pyxnat_xpath_on_a_session(demo_server: TestServer) -> None:
    import pyxnat  # a test dependency (pyproject.toml)
    interface = pyxnat.Interface(server=demo_server.url, user="admin", password="admin")
    try:
        session = interface.select.project("NEURO_PUB").subject("NP001").experiment("NP001_MR2")
        assert session.xpath("xnat:date/text()") == ["2023-09-19"]
        assert session.xpath("xnat:fieldStrength/text()") == ["3.0"]
        assert session.xpath("/xnat:MRSession/@label") == ["NP001_MR2"]
        scan_ids = session.xpath("xnat:scans/xnat:scan/@ID")
        assert scan_ids == ["1", "2", "3"]
        assert session.xpath("xnat:scans/xnat:scan[@ID='2']/xnat:file/@label") == [
            "DICOM", "SNAPSHOTS", "NIFTI"]
    finally:
        interface.disconnect()
