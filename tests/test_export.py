"""Bit packing, save/load round trips, file size against size_report, and every corrupt-file / mismatch case."""

import json
import math
import os
import struct
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from lr2vq_analysis.exceptions import (
    CompressedFileError,
    InvalidParameterError,
    InvalidWeightsError,
    NonFiniteError,
    StateError,
    WeightFileError,
)
from lr2vq_analysis.export import (
    check_reconstruction,
    code_bits,
    load_compressed,
    pack_codes,
    save_compressed,
    unpack_codes,
)
from lr2vq_analysis.nn import compress
from lr2vq_analysis.plan import LayerPlan
from lr2vq_analysis.size import size_report


@pytest.mark.parametrize("k", [2, 3, 256, 2048, 1000])
def test_pack_round_trip(k):
    rng = np.random.default_rng(k)
    codes = np.concatenate([[0, k - 1], rng.integers(0, k, size=997)])
    bits = code_bits(k)
    assert bits == math.ceil(math.log2(k))
    packed = pack_codes(codes, bits)
    assert packed.dtype == np.uint8 and packed.size == math.ceil(codes.size * bits / 8)
    np.testing.assert_array_equal(unpack_codes(packed, bits, codes.size), codes)


def test_pack_matches_a_plain_bit_string():
    codes, bits = [5, 3, 6, 1, 7], 3
    # Independent reference: concatenate each code's bits, least significant first, into bytes.
    stream = "".join(format(code, f"0{bits}b")[::-1] for code in codes)
    stream += "0" * (-len(stream) % 8)
    expected = [int(stream[i : i + 8][::-1], 2) for i in range(0, len(stream), 8)]
    assert pack_codes(codes, bits).tolist() == expected


def test_pack_rejects_codes_out_of_range():
    with pytest.raises(InvalidParameterError, match=r"0\.\.3"):
        pack_codes([4], 2)
    with pytest.raises(WeightFileError, match="need 2"):
        unpack_codes(np.zeros(1, np.uint8), 3, 5)


def _toy_model(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )
    with torch.no_grad():  # non-trivial batch-norm statistics
        for bn in (model[1], model[4]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    return model.eval()


PLAN = {
    "3.weight": LayerPlan(k=32, m=9, d_tilde=4),  # LR²VQ
    "6.weight": LayerPlan(k=256, m=18),  # PQ
    "10.weight": LayerPlan(k=3, m=4, d_tilde=2),  # k not a power of two
}


def _quantized(seed=0):
    cmodel = compress(_toy_model(seed), PLAN).quantize(seed=0)
    # Move the codebooks off the fp16 grid, as fine-tuning does, then round them back.
    with torch.no_grad():
        for layer in cmodel.compressed_layers().values():
            layer.codebook.mul_(1.001)
    return cmodel.round_fp16_()


@pytest.mark.parametrize("fold", [False, True])
def test_round_trip_outputs_equal(tmp_path, fold):
    cmodel = _quantized()
    path = save_compressed(cmodel, tmp_path / "model.lr2vq", fold_batchnorm=fold)
    loaded = load_compressed(path, _toy_model(seed=1))  # a skeleton with other weights
    assert loaded.state == "quantized" and loaded.plan == PLAN
    for key, layer in cmodel.compressed_layers().items():
        other = loaded.compressed_layers()[key]
        assert torch.equal(layer.weight, other.weight) and torch.equal(layer.codes, other.codes)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        if fold:  # folded batch norm: same function up to float32 rounding
            torch.testing.assert_close(loaded(x), cmodel(x), rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(loaded(x), cmodel(x))
    assert list(tmp_path.iterdir()) == [path]  # the atomic write leaves no temporary file


def test_file_size_matches_size_report(tmp_path):
    cmodel = _quantized()
    path = save_compressed(cmodel, tmp_path / "model.lr2vq")
    raw = path.read_bytes()
    header = 8 + struct.unpack("<Q", raw[:8])[0]
    payload = len(raw) - header
    expected = size_report(cmodel).compressed_bits / 8
    assert abs(payload - expected) <= 0.05 * expected
    assert len(raw) - header < size_report(cmodel).uncompressed_bits / 8


def test_saving_an_off_grid_codebook_warns(tmp_path):
    cmodel = compress(_toy_model(), PLAN).quantize(seed=0)
    with torch.no_grad():
        cmodel.compressed_layers()["3.weight"].codebook.mul_(1.001)
    with pytest.warns(UserWarning, match=r"'3\.weight'.*round_fp16_"):
        save_compressed(cmodel, tmp_path / "model.lr2vq")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_compressed(cmodel.round_fp16_(), tmp_path / "model.lr2vq")


def test_save_requires_quantized_layers(tmp_path):
    with pytest.raises(StateError, match=r"'3\.weight' is in state 'lowrank'.*quantize"):
        save_compressed(compress(_toy_model(), PLAN), tmp_path / "model.lr2vq")
    with pytest.raises(InvalidParameterError, match="CompressedModel"):
        save_compressed(_toy_model(), tmp_path / "model.lr2vq")


@pytest.fixture(scope="module")
def saved_bytes(tmp_path_factory):
    return save_compressed(_quantized(), tmp_path_factory.mktemp("saved") / "model.lr2vq").read_bytes()


@pytest.fixture
def saved(tmp_path, saved_bytes):
    path = tmp_path / "model.lr2vq"
    path.write_bytes(saved_bytes)
    return path


def test_truncated_file(saved):
    raw = saved.read_bytes()
    for length in (4, 100, len(raw) - 1):
        saved.write_bytes(raw[:length])
        with pytest.raises(WeightFileError, match="truncated"):
            load_compressed(saved, _toy_model())


def test_corrupt_payload_fails_the_checksum(saved):
    raw = bytearray(saved.read_bytes())
    raw[-3] ^= 0xFF
    saved.write_bytes(bytes(raw))
    with pytest.raises(WeightFileError, match="checksum"):
        load_compressed(saved, _toy_model())


def _rewrite_metadata(path, **changes):
    raw = path.read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + length])
    header["__metadata__"].update(changes)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + length :])


def test_wrong_checksum_format_and_version(saved):
    _rewrite_metadata(saved, checksum="0" * 64)
    with pytest.raises(WeightFileError, match="checksum"):
        load_compressed(saved, _toy_model())
    _rewrite_metadata(saved, version="99")
    with pytest.raises(WeightFileError, match="version '99'"):
        load_compressed(saved, _toy_model())
    _rewrite_metadata(saved, format="other")
    with pytest.raises(WeightFileError, match="not an LR²VQ file"):
        load_compressed(saved, _toy_model())


def test_garbage_and_missing_files(tmp_path):
    garbage = tmp_path / "garbage.lr2vq"
    garbage.write_bytes(struct.pack("<Q", 10) + b"not json!!" + b"\0" * 20)
    with pytest.raises(WeightFileError, match="unreadable header"):
        load_compressed(garbage, _toy_model())
    with pytest.raises(WeightFileError, match="cannot read"):
        load_compressed(tmp_path / "absent.lr2vq", _toy_model())


def test_skeleton_mismatch(saved):
    wider = _toy_model()
    wider[6] = nn.Conv2d(32, 64, 3, padding=1, bias=False)
    with pytest.raises(InvalidParameterError, match=r"does not match.*'6\.weight'.*\(64, 32, 3, 3\)"):
        load_compressed(saved, wider)
    shorter = nn.Sequential(*list(_toy_model())[:8])
    with pytest.raises(InvalidParameterError, match=r"does not match.*'10\.weight'"):
        load_compressed(saved, shorter)
    other_head = _toy_model()
    other_head[10] = nn.Linear(32, 10, bias=False)
    with pytest.raises(InvalidParameterError, match=r"does not match.*10\.bias"):
        load_compressed(saved, other_head)


# ---------------------------------------------------------------------------------------------------------
# numerics: the fp16 grid with a power-of-two scale per tensor


def _scaled_linear(scale, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        model[0].weight.mul_(scale)
    return model.eval()


@pytest.mark.parametrize("d_tilde", [2, 4])
@pytest.mark.parametrize("scale", [1e-30, 1e-9, 1e-6, 1e5, 1e8, 1e30])
def test_any_weight_scale_survives_the_file(tmp_path, scale, d_tilde):
    # fp16 alone overflows above 65504 and flushes below ~6e-8 to zero. Reference: the same model at unit
    # scale; compression is scale-equivariant, so the reloaded weight / scale matches it to fp16 precision.
    plan = {"0.weight": LayerPlan(k=8, m=4, d_tilde=d_tilde)}

    def reloaded_weight(s):
        cmodel = compress(_scaled_linear(s), plan).quantize(seed=0)
        path = save_compressed(cmodel, tmp_path / f"{s}.lr2vq")
        loaded = load_compressed(path, _scaled_linear(1.0, seed=1))
        assert torch.equal(loaded.module[0].weight, cmodel.module[0].weight)  # file == memory, bit for bit
        return loaded.module[0].weight.detach().double()

    reference = reloaded_weight(1.0)
    weight = reloaded_weight(scale)
    assert torch.isfinite(weight).all() and weight.abs().min() > 0
    torch.testing.assert_close(weight / scale, reference, rtol=0, atol=2e-3 * float(reference.abs().max()))


def test_round_fp16_keeps_large_and_tiny_projections(tmp_path):
    cmodel = compress(_scaled_linear(1.0), {"0.weight": LayerPlan(k=8, m=4, d_tilde=2)}).quantize(seed=0)
    layer = cmodel.compressed_layers()["0.weight"]
    with torch.no_grad():  # as training might leave them: P far beyond fp16's range, codebook far below
        layer.P.mul_(3e6)
        layer.codebook.div_(3e6)
    expected = layer.weight.detach().clone()
    cmodel.round_fp16_()
    assert torch.isfinite(layer.P).all() and layer.codebook.abs().max() > 0
    torch.testing.assert_close(layer.weight.detach(), expected, rtol=2e-3, atol=1e-3 * float(expected.abs().max()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # on the grid: no rounding warning
        path = save_compressed(cmodel, tmp_path / "model.lr2vq")
    assert torch.equal(load_compressed(path, _scaled_linear(1.0)).module[0].weight, layer.weight)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["codebook", "P"])
def test_non_finite_codebook_or_projection_is_refused_before_writing(tmp_path, bad, where):
    cmodel = compress(_scaled_linear(1.0), {"0.weight": LayerPlan(k=8, m=4, d_tilde=2)}).quantize(seed=0)
    with torch.no_grad():
        getattr(cmodel.compressed_layers()["0.weight"], where)[0, 0] = bad
    target = tmp_path / "model.lr2vq"
    target.write_bytes(b"old")
    with pytest.raises(NonFiniteError, match=r"'0\.weight'.*NaN/Inf"):
        save_compressed(cmodel, target)
    with pytest.raises(NonFiniteError, match=r"'0\.weight'.*NaN/Inf"):
        check_reconstruction(cmodel)
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["model.lr2vq"]


def test_overflowing_reconstruction_and_zero_weights_are_refused(tmp_path):
    cmodel = compress(_scaled_linear(1.0), {"0.weight": LayerPlan(k=8, m=4, d_tilde=2)}).quantize(seed=0)
    layer = cmodel.compressed_layers()["0.weight"]
    with torch.no_grad():  # both finite and on the grid, but codebook·P overflows float32
        layer.codebook.fill_(2.0**100)
        layer.P.fill_(2.0**100)
    with pytest.raises(NonFiniteError, match=r"'0\.weight'.*stored weight"):
        save_compressed(cmodel, tmp_path / "a.lr2vq")
    with torch.no_grad():
        layer.codebook.zero_()
    with pytest.raises(InvalidWeightsError, match=r"'0\.weight'.*all zeros"):
        save_compressed(cmodel, tmp_path / "a.lr2vq")
    with pytest.raises(InvalidWeightsError, match="all zeros"):
        check_reconstruction(cmodel)
    with torch.no_grad():
        layer.codebook.fill_(1.0)
        cmodel.module[2].bias[0] = float("nan")  # an uncompressed tensor
    with pytest.raises(NonFiniteError, match=r"'2\.bias'"):
        check_reconstruction(cmodel)
    assert not list(tmp_path.iterdir())


def test_saving_twice_gives_identical_bytes(tmp_path):
    cmodel = _quantized()
    first = save_compressed(cmodel, tmp_path / "a.lr2vq").read_bytes()
    for name in ("b", "c", "d"):
        assert save_compressed(cmodel, tmp_path / f"{name}.lr2vq").read_bytes() == first
    # A fresh compression with the same seed gives the same file too.
    assert save_compressed(_quantized(), tmp_path / "e.lr2vq").read_bytes() == first


def test_file_reads_with_the_reference_safetensors_reader(saved):
    tensors = load_safetensors(saved.read_bytes())
    assert tensors["6.weight.codebook"].dtype == torch.float16 and tensors["3.weight.codes"].dtype == torch.uint8


def test_load_never_factorises_or_clusters(saved, monkeypatch):
    # Loading builds the quantized layers directly: no spectrum, no k-means, no dense weight of the planned layers.
    import lr2vq_analysis.nn as nn_module

    def forbidden(*args, **kwargs):
        raise AssertionError("load_compressed must not recompute anything")

    monkeypatch.setattr(nn_module, "compute_spectrum", forbidden)
    monkeypatch.setattr(nn_module, "kmeans", forbidden)
    loaded = load_compressed(saved, _toy_model())
    assert loaded.state == "quantized"
    for key in PLAN:
        assert loaded.module.get_submodule(key.rpartition(".")[0]).codebook.device.type == "cpu"


# ---------------------------------------------------------------------------------------------------------
# crafted files with a recomputed checksum


def _craft(path, edit_manifest=None, edit_tensors=None, version=None):
    """Rewrite a saved file with another manifest/tensors and a valid checksum, using safetensors' own writer."""
    from lr2vq_analysis.export import _checksum

    raw = path.read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    metadata = json.loads(raw[8 : 8 + length])["__metadata__"]
    tensors = load_safetensors(raw)
    manifest = json.loads(metadata["manifest"])
    if edit_manifest:
        manifest = edit_manifest(manifest)
    if edit_tensors:
        edit_tensors(tensors)
    text = manifest if isinstance(manifest, str) else json.dumps(manifest)
    metadata = {**metadata, "manifest": text, "checksum": _checksum(text, tensors)}
    if version is not None:
        metadata["version"] = version
    path.write_bytes(save_safetensors(tensors, metadata=metadata))


def _set(key, field, value):
    def edit(manifest):
        if value is _DELETE:
            del manifest["layers"][key][field]
        else:
            manifest["layers"][key][field] = value
        return manifest

    return edit


_DELETE = object()
LAYER_FIELD_CASES = [
    ("10.weight", "code_bits", 0),  # every code would read as 0
    ("10.weight", "code_bits", 1),  # too few bits for k = 3
    ("10.weight", "code_bits", 3),  # more bits than k needs
    ("3.weight", "code_bits", "5"),
    ("3.weight", "code_bits", 5.0),
    ("3.weight", "code_bits", True),
    ("3.weight", "k", "32"),
    ("3.weight", "k", 32.9),
    ("3.weight", "k", 32.0),
    ("3.weight", "k", None),
    ("3.weight", "k", 1),
    ("3.weight", "k", 10**9),
    ("3.weight", "m", 7),  # does not divide the row length 144
    ("3.weight", "m", 0),
    ("3.weight", "d_tilde", 0),
    ("3.weight", "d_tilde", 10),
    ("3.weight", "d_tilde", [4]),
    ("3.weight", "shape", [32, 16, 3]),
    ("3.weight", "shape", [32, 0, 3, 3]),
    ("3.weight", "shape", "32x16x3x3"),
    ("3.weight", "shape", [32.0, 16, 3, 3]),
    ("3.weight", "shape", [1, 1, 1, 1, 1]),
    ("3.weight", "codebook_exponent", 10**6),
    ("3.weight", "codebook_exponent", "0"),
    ("3.weight", "codebook_exponent", 0.5),
    ("3.weight", "projection_exponent", None),  # LR²VQ layer: needs one
    ("6.weight", "projection_exponent", 0),  # PQ layer: has none
    ("3.weight", "extra", 1),
    *[("3.weight", field, _DELETE) for field in ("k", "m", "d_tilde", "shape", "code_bits", "codebook_exponent")],
]


@pytest.mark.parametrize("key,field,value", LAYER_FIELD_CASES)
def test_crafted_layer_fields_are_refused(saved, key, field, value):
    _craft(saved, _set(key, field, value))
    with pytest.raises(CompressedFileError, match=rf"{key.split('.')[0]}\.weight"):
        load_compressed(saved, _toy_model())


def _drop(field):
    def edit(manifest):
        del manifest[field]
        return manifest

    return edit


@pytest.mark.parametrize(
    "edit",
    [
        _drop("layers"),
        _drop("dense"),
        _drop("folded_batchnorms"),
        lambda m: "{not json",
        lambda m: json.dumps([1, 2]),
        lambda m: {**m, "layers": {}},
        lambda m: {**m, "layers": []},
        lambda m: {**m, "layers": {**m["layers"], "3.weight": [32, 9, 4]}},
        lambda m: {**m, "dense": "0.weight"},
        lambda m: {**m, "dense": [*m["dense"], m["dense"][0]]},
        lambda m: {**m, "dense": [*m["dense"], "3.weight.codes"]},
        lambda m: {**m, "dense": m["dense"][1:]},
        lambda m: {**m, "folded_batchnorms": [1]},
        lambda m: {**m, "folded_batchnorms": ["7"]},
        lambda m: {**m, "unknown": 1},
    ],
)
def test_crafted_manifests_are_refused(saved, edit):
    _craft(saved, edit)
    with pytest.raises(CompressedFileError, match="corrupt or not an LR²VQ file"):
        load_compressed(saved, _toy_model())


def _replace(name, make):
    def edit(tensors):
        if make is None:
            del tensors[name]
        else:
            tensors[name] = make(tensors[name])

    return edit


@pytest.mark.parametrize(
    "edit,match",
    [
        (_replace("3.weight.codebook", lambda t: torch.full_like(t, float("nan"))), "NaN"),
        (_replace("6.weight.codebook", lambda t: torch.where(t > 0, float("inf"), t)), "NaN"),
        (_replace("3.weight.projection", lambda t: t.float()), "float32"),
        (_replace("3.weight.codebook", lambda t: t.to(torch.int16)), "int16"),
        (_replace("3.weight.codebook", lambda t: t[:-1]), r"\(31, 4\)"),
        (_replace("3.weight.codes", lambda t: t[:-1]), "uint8"),
        (_replace("3.weight.codes", lambda t: t.to(torch.int8)), "int8"),
        (_replace("3.weight.projection", None), "missing"),
        (_replace("1.folded_scale", lambda t: t.double()), "float64"),
        (_replace("4.folded_shift", lambda t: torch.full_like(t, float("nan"))), "NaN"),
        (lambda tensors: tensors.update({"extra": torch.zeros(2)}), "not in the manifest"),
        # k = 3 stores 2 bits per code: the code 3 fits the bits but not the codebook.
        (_replace("10.weight.codes", lambda t: torch.full_like(t, 0xFF)), r"codes up to 3, beyond k - 1 = 2"),
    ],
)
def test_crafted_tensors_are_refused(saved, edit, match):
    _craft(saved, edit_tensors=edit)
    with pytest.raises(CompressedFileError, match=match):
        load_compressed(saved, _toy_model())


@pytest.mark.parametrize("field", ["manifest", "checksum"])
def test_missing_metadata_fields_are_refused(saved, field):
    raw = saved.read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + length])
    del header["__metadata__"][field]
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    saved.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + length :])
    with pytest.raises(CompressedFileError, match=field):
        load_compressed(saved, _toy_model())


def test_version_1_files_still_load(saved):
    # Version 1 stored plain fp16 values (scale 1) and no exponents: rewrite the file that way by hand.
    reference = load_compressed(saved, _toy_model())
    manifest = json.loads(
        json.loads(saved.read_bytes()[8 : 8 + struct.unpack("<Q", saved.read_bytes()[:8])[0]])["__metadata__"][
            "manifest"
        ]
    )
    exponents = {
        key: (entry["codebook_exponent"], entry["projection_exponent"]) for key, entry in manifest["layers"].items()
    }

    def to_v1(m):
        for entry in m["layers"].values():
            del entry["codebook_exponent"], entry["projection_exponent"]
        return m

    def unscale(tensors):
        for key, (codebook_e, projection_e) in exponents.items():
            tensors[f"{key}.codebook"] = (tensors[f"{key}.codebook"].double() * 2.0**codebook_e).half()
            if projection_e is not None:
                tensors[f"{key}.projection"] = (tensors[f"{key}.projection"].double() * 2.0**projection_e).half()

    _craft(saved, to_v1, unscale, version="1")
    loaded = load_compressed(saved, _toy_model())
    for key, layer in reference.compressed_layers().items():  # plain fp16: equal up to fp16's subnormal spacing
        torch.testing.assert_close(loaded.compressed_layers()[key].weight, layer.weight, rtol=1e-3, atol=6e-8)


def test_non_regular_file_is_refused(tmp_path):
    fifo = tmp_path / "pipe.lr2vq"
    os.mkfifo(fifo)
    with pytest.raises(CompressedFileError, match="not a regular file"):
        load_compressed(fifo, _toy_model())


@pytest.mark.parametrize("scale", [1e-9, 1e8])
def test_cli_compress_reports_success_only_for_a_usable_file(tmp_path, capsys, scale):
    # Before the fp16 scale, 1e8 gave an all-Inf file and 1e-9 an all-zero one, both reported as success.
    from safetensors.torch import save_file

    from lr2vq_analysis.cli import main

    model = _scaled_linear(scale)
    weights = tmp_path / "model.safetensors"
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, str(weights))
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"0.weight": {"k": 8, "m": 4, "d_tilde": 2}}))
    out = tmp_path / "model.lr2vq"
    code = main(["compress", str(weights), "--plan", str(plan), "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    loaded = load_compressed(out, _scaled_linear(1.0, seed=1))
    weight = loaded.module[0].weight.detach().double()
    original = model[0].weight.detach().double()
    assert torch.isfinite(weight).all() and weight.abs().min() > 0
    assert float((weight - original).norm() / original.norm()) < 0.9  # an approximation at the right scale


def _edit_header(path, edit):
    raw = path.read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + length])
    edit(header)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + length :])


def _first_tensor(header):
    return min((key for key in header if key != "__metadata__"), key=lambda key: header[key]["data_offsets"][0])


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda h: h[_first_tensor(h)].update(dtype="C64"), "unsupported dtype"),
        (lambda h: h[_first_tensor(h)].update(shape=[-1]), "shape"),
        (lambda h: h[_first_tensor(h)].update(shape=[1.5]), "shape"),
        (lambda h: h[_first_tensor(h)].update(data_offsets=[0]), "data offsets"),
        (lambda h: h[_first_tensor(h)].update(data_offsets=[8, 8 + h[_first_tensor(h)]["data_offsets"][1]]), "gap"),
        (lambda h: h[_first_tensor(h)].update(shape=[3]), "occupies"),
        (lambda h: h[_first_tensor(h)].pop("dtype"), "malformed"),
        (lambda h: h.update(extra={"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}), "overlaps"),
    ],
)
def test_malformed_tensor_headers_are_refused(saved, edit, match):
    _edit_header(saved, edit)
    with pytest.raises(CompressedFileError, match=match):
        load_compressed(saved, _toy_model())
