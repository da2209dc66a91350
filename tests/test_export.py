"""Bit packing, save/load round trips, file size against size_report, and every corrupt-file / mismatch case."""

import json
import math
import struct
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from lr2vq_analysis._validation import InvalidParameterError, WeightFileError
from lr2vq_analysis.export import code_bits, load_compressed, pack_codes, save_compressed, unpack_codes
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
    with pytest.raises(InvalidParameterError, match=r"'3\.weight' is in state 'lowrank'.*quantize"):
        save_compressed(compress(_toy_model(), PLAN), tmp_path / "model.lr2vq")
    with pytest.raises(InvalidParameterError, match="CompressedModel"):
        save_compressed(_toy_model(), tmp_path / "model.lr2vq")


@pytest.fixture
def saved(tmp_path):
    return save_compressed(_quantized(), tmp_path / "model.lr2vq")


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
