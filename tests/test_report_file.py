"""report.json / report.npz: every malformed file is refused with ReportFileError; only valid JSON is written."""

import copy
import io
import json
import math
import os
import zipfile
from dataclasses import replace
from html.parser import HTMLParser

import numpy as np
import pytest

import lr2vq_analysis
from lr2vq_analysis import _report_file
from lr2vq_analysis.exceptions import LR2VQError, ReportFileError
from lr2vq_analysis.report import LayerReport, Report, analyze


def make_state():
    rng = np.random.default_rng(1)
    scale = np.linspace(1.0, 0.2, 9).reshape(3, 3)
    return {
        "block1.weight": rng.normal(size=(32, 8, 3, 3)) * scale,
        "block2.weight": rng.normal(size=(48, 32, 3, 3)) * scale,
        "head.weight": rng.normal(size=(10, 36)),
    }


@pytest.fixture(scope="module")
def report():
    return analyze(make_state(), k=16, m=9, keep_first_conv=True, progress=False)


def strict_json(text):
    """Parse as standard JSON: NaN/Infinity tokens are not JSON."""

    def refuse(token):
        raise ValueError(f"non-standard token {token}")

    return json.loads(text, parse_constant=refuse)


def write_json(tmp_path, data, name="report.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))  # Python's default writes NaN/Infinity tokens, like older versions
    return path


# -- what is written --------------------------------------------------------------------------------


def test_report_json_is_standard_json_with_the_package_version(report, tmp_path):
    path = report.save(tmp_path / "report.json")
    data = strict_json(path.read_text())
    assert data["package_version"] == lr2vq_analysis.__version__
    assert [layer["name"] for layer in data["layers"]] == list(report)


def test_missing_values_are_written_as_null_and_read_back_as_nan(report, tmp_path):
    layer = report.layers[0]
    params = {**layer.model.params_, "calibration_slope": math.nan}
    model = type(layer.model).from_dict({**layer.model.to_dict(), "params": params})
    measured = np.linspace(0.1, 0.5, 9)
    measured[4] = math.nan
    changed = Report(
        [LayerReport(layer.name, layer.kind, layer.shape, model, measured), *report.layers[1:]], report.k, report.m
    )
    for suffix in (".json", ".npz"):
        path = changed.save(tmp_path / f"r{suffix}")
        if suffix == ".json":
            data = strict_json(path.read_text())
            assert data["layers"][0]["model"]["params"]["calibration_slope"] is None
            assert data["layers"][0]["measured_curve"][4] is None
        loaded = Report.load(path)
        assert math.isnan(loaded.layers[0].model.params_["calibration_slope"])
        np.testing.assert_array_equal(loaded.layers[0].measured_curve, measured)  # NaN at the same place


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_curve_is_refused_on_save_and_nothing_is_written(report, tmp_path, bad):
    layer = report.layers[1]
    data = layer.model.to_dict()
    data["clustering_curve"][3] = bad
    broken = Report(
        [report.layers[0], LayerReport(layer.name, layer.kind, layer.shape, type(layer.model).from_dict(data))], 16, 9
    )
    with pytest.raises(ReportFileError, match=r"block2.weight.*clustering_curve\[3\]"):
        broken.save(tmp_path / "report.json")
    assert list(tmp_path.iterdir()) == []


# -- what is refused on load ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[1, 2, 3]", "list; expected an object"),
        ("null", "null; expected an object"),
        ('"report"', "string; expected an object"),
        ("42", "number; expected an object"),
        ("true", "boolean; expected an object"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ('{"a":' * 100_000 + "1" + "}" * 100_000, "nested too deeply"),
        ("", "not valid JSON"),
        ("\xff\xfe", "not UTF-8|not valid JSON"),
        ("{NaN}", "not valid JSON"),
    ],
    ids=["list", "null", "string", "number", "bool", "deep-list", "deep-object", "empty", "binary", "garbage"],
)
def test_reports_that_are_not_objects_are_refused(tmp_path, text, message):
    path = tmp_path / "report.json"
    path.write_bytes(text.encode("latin-1") if text.startswith("\xff") else text.encode())
    with pytest.raises(ReportFileError, match=message):
        Report.load(path)


def _set(data, path, value):
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value


def _delete(data, path):
    target = data
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]


L0 = ("layers", 0)
M0 = ("layers", 0, "model")


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("format_version",), "1", "format version '1'"),
        (("format_version",), True, "format version True"),
        (("format_version",), 99, "format version 99"),
        (("k",), "16", r"k is '16' \(str\)"),
        (("k",), 16.5, r"k is 16.5 \(float\)"),
        (("m",), None, r"m is None \(null\)"),
        (("source",), 3, "source"),
        (("package_version",), 0.1, "package_version"),
        (("skipped",), [], "skipped is a JSON list"),
        (("skipped",), {"x": 1}, r"skipped\['x'\]"),
        (("layers",), {}, "layers is a JSON object"),
        (("layers",), [], "non-empty list"),
        (("layers",), "abc", "layers is a JSON string"),
        (L0, [1, 2], r"layers\[0\] is a JSON list"),
        (L0, None, r"layers\[0\] is a JSON null"),
        ((*L0, "name"), 3, r"layers\[0\].name"),
        ((*L0, "kind"), ["conv"], "kind"),
        ((*L0, "shape"), "32x8x3x3", "shape"),
        ((*L0, "shape"), [32, 8, 3, 0], r"shape\[3\] is 0"),
        ((*L0, "shape"), [32, 8, 3, 3.0], r"shape\[3\]"),
        ((*L0, "shape"), [32, 8, 3, 6], "n_subvectors is 256; the layer's 4608 weights make 512"),
        ((*L0, "shape"), [32, 8, 3, 4], "does not divide"),
        ((*L0, "model"), "model", "model is a JSON string"),
        ((*M0, "k"), "16", r"model.k is '16'"),
        ((*M0, "k"), 1, "model.k is 1"),
        ((*M0, "k"), 4096, "below the layer's 256 subvectors"),
        ((*M0, "m"), 7, "does not divide"),
        ((*M0, "rho"), "0.85", "rho"),
        ((*M0, "rho"), 1.5, r"rho is 1.5; expected a number in \(0, 1\]"),
        ((*M0, "rho"), math.nan, "rho is nan"),
        ((*M0, "name"), 5, "model.name"),
        ((*M0, "eigenvalues"), [0.5] * 8, "eigenvalues is 8 entries; expected a list of m=9"),
        ((*M0, "eigenvalues", 8), -math.inf, r"eigenvalues\[8\] is -inf"),
        ((*M0, "lowrank_curve"), {"1": 0.5}, "lowrank_curve is a JSON object"),
        ((*M0, "lowrank_curve", 0), math.inf, r"lowrank_curve\[0\] is inf"),
        ((*M0, "lowrank_curve", 0), -0.5, "in \\[0, 1\\]"),
        ((*M0, "clustering_curve", 0), 3.0, "clustering_curve holds 3.0"),
        ((*M0, "probes"), {"2": -0.1}, "is -0.1; a measured error"),
        ((*M0, "clustering_curve", 3), math.nan, r"layer 'block1.weight'.*clustering_curve\[3\] is nan"),
        ((*M0, "clustering_curve", 3), None, r"clustering_curve\[3\] is None"),
        ((*M0, "clustering_curve", 3), "0.1", r"clustering_curve\[3\] is '0.1' \(str\)"),
        ((*M0, "clustering_curve", 3), [0.1], r"clustering_curve\[3\]"),
        ((*M0, "clustering_curve", 3), True, r"clustering_curve\[3\] is True \(bool\)"),
        ((*M0, "knee"), 0, "knee is 0"),
        ((*M0, "knee"), 10, "knee is 10"),
        ((*M0, "knee"), "3", "knee"),
        ((*M0, "probes"), [[1, 0.2]], "probes is a JSON list"),
        ((*M0, "probes"), {"one": 0.2}, "probes has the key 'one'"),
        ((*M0, "probes"), {"12": 0.2}, "probes has the key '12'"),
        ((*M0, "probes"), {"2": math.nan}, r"probes\[2\] is nan"),
        ((*M0, "params"), None, "params is a JSON null"),
        ((*M0, "params"), {"calibration": "high"}, "params"),
        ((*M0, "params"), {"calibration": math.inf}, "params"),
        ((*M0, "n_subvectors"), 255, "n_subvectors is 255"),
        ((*L0, "measured_curve"), [0.1] * 3, "measured_curve is 3 entries"),
        ((*L0, "measured_curve"), "none", "measured_curve is a JSON string"),
    ],
)
def test_fields_of_the_wrong_type_or_value_are_refused(report, tmp_path, path, value, message):
    data = copy.deepcopy(report.to_dict())
    _set(data, path, value)
    with pytest.raises(ReportFileError, match=message):
        Report.load(write_json(tmp_path, data))


@pytest.mark.parametrize(
    "path",
    [("format_version",), ("k",), ("m",), ("layers",), (*L0, "name"), (*L0, "kind"), (*L0, "shape"), (*L0, "model")]
    + [(*M0, key) for key in ("k", "m", "rho", "eigenvalues", "lowrank_curve", "clustering_curve", "knee")]
    + [(*M0, key) for key in ("probes", "params", "n_subvectors")],
)
def test_missing_fields_are_refused_by_name(report, tmp_path, path):
    data = copy.deepcopy(report.to_dict())
    _delete(data, path)
    with pytest.raises(ReportFileError, match=f"lacks the field '{path[-1]}'"):
        Report.load(write_json(tmp_path, data))


def test_duplicate_layer_names_are_refused(report, tmp_path):
    data = copy.deepcopy(report.to_dict())
    data["layers"][1]["name"] = data["layers"][0]["name"]
    data["layers"][1]["model"] = copy.deepcopy(data["layers"][0]["model"])
    data["layers"][1]["shape"] = data["layers"][0]["shape"]
    with pytest.raises(ReportFileError, match="appears twice"):
        Report.load(write_json(tmp_path, data))


def _leaves(value, path=()):
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _leaves(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _leaves(item, (*path, index))
    else:
        yield path


def test_every_field_replaced_by_every_kind_of_wrong_value_is_refused_or_loads_finite(report, tmp_path):
    """The class of malformed reports: every leaf and every container replaced by null, a string, a list,
    an object, a bool, NaN, ±Infinity, a negative and a huge number. Loading either refuses with
    ReportFileError or gives a report whose curves are finite and whose d̃ are in range; nothing else."""
    base = report.to_dict()
    base["layers"] = base["layers"][:1]  # one layer keeps the product of cases small
    base["layers"][0]["measured_curve"] = [0.1] * 9
    paths = set(_leaves(base))
    for path in list(paths):  # the containers too
        paths.update(path[:i] for i in range(1, len(path)))
    replacements = [None, "x", [], {}, [1.0], {"a": 1}, True, math.nan, math.inf, -math.inf, -1, 10**30, 0.5]
    outcomes = {"refused": 0, "loaded": 0}
    path_file = tmp_path / "report.json"
    for path in sorted(paths, key=str):
        for value in replacements:
            data = copy.deepcopy(base)
            _set(data, path, value)
            path_file.write_text(json.dumps(data))
            try:
                loaded = Report.load(path_file)
            except ReportFileError:
                outcomes["refused"] += 1
                continue
            outcomes["loaded"] += 1
            for layer in loaded.layers:
                assert np.isfinite(layer.total_curve).all(), (path, value)
                assert 1 <= layer.d_tilde <= layer.m and 1 <= layer.knee <= layer.m, (path, value)
            assert 1 <= loaded.global_d_tilde <= loaded.m
    assert outcomes["refused"] > 3 * outcomes["loaded"]  # most replacements are wrong; some are harmless


def test_a_nan_in_a_curve_cannot_change_the_plan(report, tmp_path):
    """A NaN in one curve used to move that layer's d̃ and the global d̃: now the file is refused."""
    data = report.to_dict()
    data["layers"][2]["model"]["clustering_curve"][0] = math.nan
    path = write_json(tmp_path, data)
    assert "NaN" in path.read_text()
    with pytest.raises(ReportFileError, match=r"layer 'head.weight'.*clustering_curve\[0\] is nan"):
        Report.load(path)


def test_errors_are_lr2vq_errors_and_oserrors(report, tmp_path):
    with pytest.raises(LR2VQError):
        Report.load(write_json(tmp_path, []))
    with pytest.raises(OSError):
        Report.load(write_json(tmp_path, None))


def test_from_dict_validates_too(report):
    with pytest.raises(ReportFileError, match="expected an object"):
        Report.from_dict([1, 2])
    assert Report.from_dict(report.to_dict()) == report


# -- files that are not reports, and resource bombs -------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "report.json"
    os.mkfifo(fifo)
    with pytest.raises(ReportFileError, match="not a regular file"):
        Report.load(fifo)


def test_an_oversized_json_report_is_refused_before_reading(report, tmp_path, monkeypatch):
    path = report.save(tmp_path / "report.json")
    monkeypatch.setattr(_report_file, "MAX_REPORT_BYTES", path.stat().st_size - 1)
    with pytest.raises(ReportFileError, match="at most"):
        Report.load(path)


def _npz(members):
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **members)
    return buffer.getvalue()


def test_an_npz_bomb_is_refused_before_decompressing(tmp_path, monkeypatch):
    """A member whose declared uncompressed size exceeds the bound is refused before one byte is inflated."""
    path = tmp_path / "report.npz"
    path.write_bytes(_npz({"report_json": np.zeros(200_000, np.uint8)}))  # 200 kB of zeros: ~200 bytes zipped
    assert path.stat().st_size < 2000
    monkeypatch.setattr(_report_file, "MAX_REPORT_BYTES", 100_000)

    def no_decompression(*args, **kwargs):
        raise AssertionError("the member was decompressed")

    monkeypatch.setattr(zipfile.ZipExtFile, "read", no_decompression)
    with pytest.raises(ReportFileError, match="declares 200128 bytes uncompressed; at most 100000"):
        Report.load(path)


def test_an_npz_member_that_lies_about_its_size_is_refused(report, tmp_path):
    """A central directory that declares fewer bytes than the member inflates to: the read stops at the
    declared size (the zip reader never returns more), and the CRC or the .npy length check refuses it."""
    good = report.save(tmp_path / "good.npz").read_bytes()
    with zipfile.ZipFile(io.BytesIO(good)) as archive:
        info = archive.getinfo("report_json.npy")
        true_size = info.file_size
    forged = bytearray(good)
    # Patch the declared size in the central directory (offset 24 of the entry) to a tenth of the truth.
    central = forged.rfind(b"PK\x01\x02")
    forged[central + 24 : central + 28] = (true_size // 10).to_bytes(4, "little")
    local = forged.find(b"PK\x03\x04")
    forged[local + 22 : local + 26] = (true_size // 10).to_bytes(4, "little")
    path = tmp_path / "forged.npz"
    path.write_bytes(bytes(forged))
    with pytest.raises(ReportFileError):
        Report.load(path)


def test_unused_npz_members_are_never_read(report, tmp_path):
    """A huge array beside the report is never decompressed (the report loads at once)."""
    report_json = np.frombuffer(json.dumps(report.to_dict()).encode(), dtype=np.uint8)
    path = tmp_path / "report.npz"
    path.write_bytes(_npz({"report_json": report_json, "bomb": np.zeros(50_000_000, np.uint8)}))
    assert path.stat().st_size < 200_000
    assert Report.load(path) == report


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ({"other": np.zeros(3)}, "no 'report_json' array"),
        ({"report_json": np.zeros(3, np.float64)}, "float64 array"),
        ({"report_json": np.zeros((2, 2), np.uint8)}, r"shape \(2, 2\)"),
        ({"report_json": np.frombuffer(b"[1, 2]", np.uint8)}, "list; expected an object"),
    ],
)
def test_npz_reports_with_wrong_contents_are_refused(tmp_path, members, message):
    path = tmp_path / "report.npz"
    path.write_bytes(_npz(members))
    with pytest.raises(ReportFileError, match=message):
        Report.load(path)


def test_a_file_that_is_not_a_zip_is_refused(tmp_path):
    path = tmp_path / "report.npz"
    path.write_bytes(b"\x93NUMPY not a zip")
    with pytest.raises(ReportFileError, match=r"not a valid \.npz"):
        Report.load(path)


# -- the results users hold ------------------------------------------------------------------------


def test_report_is_a_mapping_in_model_order(report):
    from collections.abc import Mapping

    names = ["block1.weight", "block2.weight", "head.weight"]
    assert isinstance(report, Mapping)
    assert list(report) == names == list(report.keys())
    assert len(report) == 3
    assert [layer.name for layer in report.values()] == names
    assert dict(report.items())["head.weight"] is report.layers[2]
    assert "block2" in report and "block2.weight" in report and "block3" not in report and 3 not in report
    assert report["block2"] is report["block2.weight"] is report.layers[1]
    assert report.get("nope") is None
    with pytest.raises(KeyError, match="no analysed layer named 'nope'"):
        report["nope"]


def test_an_exact_name_wins_over_the_weight_suffix(report):
    first, second = report.layers[:2]
    renamed = Report([replace(first, name="fc"), replace(second, name="fc.weight")], report.k, report.m)
    assert renamed["fc"] is renamed.layers[0] and renamed["fc.weight"] is renamed.layers[1]


def test_skipped_layers_say_why_they_are_missing():
    rng = np.random.default_rng(0)
    report = analyze(
        {"a.weight": rng.normal(size=(8, 1, 3, 3)), "b.weight": rng.normal(size=(64, 72))}, k=16, m=9, progress=False
    )
    with pytest.raises(KeyError, match="skipped"):
        report["a.weight"]


def test_prediction_and_total_curve_match_an_independent_recomputation(report):
    data = report.to_dict()  # recompute from the raw curves, not through the report's own properties
    totals, sizes = {}, {}
    for layer in data["layers"]:
        model = layer["model"]
        totals[layer["name"]] = model["rho"] * np.array(model["lowrank_curve"]) + np.array(model["clustering_curve"])
        sizes[layer["name"]] = math.prod(layer["shape"])
    prediction = report.prediction
    assert dict(prediction) == {layer.name: layer.d_tilde for layer in report.values()}  # d̃ by the layers' rule
    weighted = sum(sizes[n] * totals[n] for n in totals) / sum(sizes.values())
    np.testing.assert_allclose(report.total_curve, weighted)
    assert prediction.global_d_tilde == report.global_d_tilde


def test_deprecated_names_warn_and_agree(report):
    with pytest.warns(DeprecationWarning, match="property"):
        assert report.prediction() == report.prediction
    with pytest.warns(DeprecationWarning, match="total_curve"):
        np.testing.assert_array_equal(report.global_total_curve(), report.total_curve)


def test_fitted_attributes_follow_scikit_learn(report):
    model = report.layers[0].model
    np.testing.assert_allclose(model.total_curve_, model.rho * model.lowrank_curve_ + model.clustering_curve_)
    assert model.d_tilde_ == int(np.argmin(model.total_curve_)) + 1
    layer = report.layers[0]  # a result container: plain names
    assert (layer.d_tilde, layer.knee, layer.probes) == (model.d_tilde_, model.knee_, model.probes_)


def test_reprs_are_short():
    rng = np.random.default_rng(0)
    state = {f"encoder.layer.{i}.dense.weight": rng.normal(size=(16, 72)) for i in range(40)}
    report = analyze(state, k=8, m=9, progress=False)
    for text in (repr(report), repr(report.layers[0]), repr(report.prediction), repr(report.layers[0].model)):
        assert len(text) < 260, text
        assert "\n" not in text
    assert "36 more" in repr(report.prediction)


class _Table(HTMLParser):
    def __init__(self):
        super().__init__()
        self.rows, self.text = [], []

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])

    def handle_data(self, data):
        self.text.append(data)
        if self.rows and self.lasttag in ("td", "th"):
            self.rows[-1].append(data)


def test_repr_html_of_a_report_lists_every_layer_escaped():
    rng = np.random.default_rng(0)
    state = {"a<b>&c.weight": rng.normal(size=(64, 72)), "fc.weight": rng.normal(size=(32, 72))}
    report = analyze(state, k=16, m=9, progress=False)
    text = report._repr_html_()
    assert "<b>&c" not in text and "a&lt;b&gt;&amp;c.weight" in text
    table = _Table()
    table.feed(text)
    body = table.rows[1:]
    assert [row[0] for row in body] == ["a<b>&c.weight", "fc.weight"]
    assert [int(row[5]) for row in body] == [layer.d_tilde for layer in report.layers]
    assert f"global d̃ = {report.global_d_tilde}" in "".join(table.text)


def test_repr_html_of_a_tradeoff_model_marks_the_argmin(report):
    model = report["block2"].model
    table = _Table()
    table.feed(model._repr_html_())
    body = table.rows[1:]
    assert len(body) == model.m
    starred = [i + 1 for i, row in enumerate(body) if "★" in row[0]]
    totals = model.rho * np.asarray(model.to_dict()["lowrank_curve"]) + np.asarray(model.to_dict()["clustering_curve"])
    assert starred == [int(np.argmin(totals)) + 1]


def test_repr_html_of_a_size_report_has_hand_computed_totals():
    from lr2vq_analysis.plan import LayerPlan
    from lr2vq_analysis.size import size_report

    state = {"conv.weight": np.zeros((64, 64, 3, 3), np.float32), "conv.bias": np.zeros(64, np.float32)}
    sizes = size_report(state, {"conv.weight": LayerPlan(k=256, m=9, d_tilde=4)})
    text = sizes._repr_html_()
    bits = 4096 * 8 + 256 * 4 * 16 + 4 * 9 * 16 + 64 * 32
    assert f"ratio {36928 * 32 / bits:.1f}×" in text
    assert f"{(4096 * 8 + 256 * 4 * 16 + 4 * 9 * 16) / 8 / 1024:.4g}" in text
    assert len(repr(sizes)) < 200


@pytest.mark.parametrize("text", ["[1, 2]", "null", '{"format_version": 1, "k": "x"}', "[" * 50_000])
def test_lr2vq_plot_refuses_a_bad_report_in_one_line(tmp_path, capsys, text):
    from lr2vq_analysis.cli import main

    path = tmp_path / "report.json"
    path.write_text(text)
    assert main(["plot", str(path), "--out", str(tmp_path / "figures")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "report.json" in err and "Traceback" not in err
