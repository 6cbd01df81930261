"""State-dict comparison: bitwise means bit patterns; tolerances never equate NaN with a number."""

import pytest
import torch

from dcprop.compare import assert_same, mismatches, same_bits
from dcprop.errors import PropertyFailure

NAN = float("nan")
INF = float("inf")
MAX = torch.finfo(torch.float32).max


def _nan_with_payload(payload: int) -> torch.Tensor:
    return torch.tensor([0x7FC00000 + payload], dtype=torch.int32).view(torch.float32)


@pytest.mark.parametrize(
    ("saved", "loaded", "shown"),
    [
        ([0.0, 1.0], [NAN, 1.0], "expected 0.0, got nan"),
        ([INF], [MAX], "expected inf, got 3.4028"),
        ([-INF], [-MAX], "expected -inf, got -3.4028"),
        ([0.0], [-0.0], "expected 0.0, got -0.0"),
        ([-0.0], [0.0], "expected -0.0, got 0.0"),
    ],
    ids=[
        "zero-as-nan",
        "inf-as-max",
        "minus-inf-as-min",
        "zero-as-minus-zero",
        "minus-zero-as-zero",
    ],
)
def test_bitwise_tells_special_values_apart(saved, loaded, shown):
    found = mismatches({"w": torch.tensor(saved)}, {"w": torch.tensor(loaded)})
    assert [m.key for m in found] == ["w"]
    assert "differ bitwise" in found[0].detail and shown in found[0].detail


def test_bitwise_compares_nan_payloads():
    quiet, other = _nan_with_payload(0), _nan_with_payload(1)
    assert not mismatches({"w": quiet}, {"w": quiet.clone()})
    (found,) = mismatches({"w": quiet}, {"w": other})
    assert "bits [2143289344]" in found.detail and "bits [2143289345]" in found.detail


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_bitwise_covers_every_float_width(dtype):
    assert mismatches(
        {"w": torch.zeros(2, dtype=dtype)}, {"w": torch.tensor([0.0, -0.0]).to(dtype)}
    )
    assert not mismatches(
        {"w": torch.ones(2, 2, dtype=dtype)}, {"w": torch.ones(2, 2, dtype=dtype)}
    )


def test_bitwise_needs_the_same_dtype():
    (found,) = mismatches({"w": torch.zeros(2)}, {"w": torch.zeros(2, dtype=torch.float64)})
    assert found.detail == "dtype torch.float32 != torch.float64"


def test_bitwise_reads_a_non_contiguous_view():
    t = torch.arange(6.0).reshape(2, 3)
    assert not mismatches({"w": t.t()}, {"w": t.t().contiguous()})


@pytest.mark.parametrize(
    ("saved", "loaded"),
    [([0.0], [NAN]), ([NAN], [0.0]), ([INF], [MAX]), ([1.0], [NAN])],
    ids=["zero-as-nan", "nan-as-zero", "inf-as-max", "one-as-nan"],
)
def test_tolerance_never_calls_nan_or_inf_equal_to_a_number(saved, loaded):
    with pytest.raises(PropertyFailure, match=r"rtol=0\.1, atol=1"):
        assert_same(
            {"w": torch.tensor(saved)},
            {"w": torch.tensor(loaded)},
            what="state",
            rank=0,
            rtol=0.1,
            atol=1.0,
        )


def test_tolerance_keeps_allclose_semantics_and_equates_nan_with_nan():
    saved = {"w": torch.tensor([1.0, NAN, INF, 0.0])}
    assert not mismatches(saved, {"w": torch.tensor([1.05, NAN, INF, -0.0])}, rtol=0.1, atol=0)
    (found,) = mismatches(saved, {"w": torch.tensor([1.5, NAN, INF, 0.0])}, rtol=0.1, atol=0)
    assert "1 of 4 elements differ" in found.detail and "expected 1.0, got 1.5" in found.detail


def test_losses_compare_bit_for_bit():
    nan = float("nan")
    assert same_bits([nan, 1.5], [nan, 1.5])  # a diverged run equals its exact replay
    assert not same_bits([0.0], [-0.0])
    assert not same_bits([1.0], [1.0 + 2**-52])
    assert not same_bits([1.0], [1.0, 1.0])
