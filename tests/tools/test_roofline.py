"""benchmarks/roofline.py: the bytes, FLOPs and time bounds against figures worked out by hand."""
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "benchmarks"))
import roofline  # noqa: E402

H100, H200 = roofline.DEVICES["H100"], roofline.DEVICES["H200"]


def test_gather_bytes_and_memory_bound_time():
    # B=64, N=196, K=98, D=768, bf16: 2 * 64*98*768 * 2 bytes = 19,267,584 + ids 64*98*8 = 50,176
    work = roofline.gather_tokens(64, 196, 98, 768, 2)
    assert work.bytes == 19_317_760 and work.flops == {}
    assert roofline.bound_ms(work, H100) == pytest.approx(19_317_760 / 3.35e12 * 1e3)  # 5.77 us
    assert roofline.bound_ms(work, H200) == pytest.approx(0.0040245, rel=1e-4)
    # backward: read 64*98*768*2 + write 64*196*768*2 = 28,901,376, + ids 50,176
    assert roofline.gather_tokens(64, 196, 98, 768, 2, backward=True).bytes == 28_951_552


def test_restore_and_indices_bytes():
    # B=2, N=4, K=2, D=3, fp32: (2*2 + 2*4 + 1) * 3 * 4 = 156, + ids 2*4*8 = 64
    assert roofline.restore_tokens(2, 4, 2, 3, 4).bytes == 220
    assert roofline.keep_indices(2, 4, 2).bytes == 96


def test_attention_flops_bytes_and_compute_bound():
    # long shape: B=8, H=16, L=2048, Dh=64, bf16: pairs 8 * 2048^2 = 33,554,432
    pairs = roofline.attention_pairs([2048] * 8)
    assert pairs == 33_554_432
    fwd = roofline.attention(pairs, 8 * 2048, 16, 64, 2)
    assert fwd.flops == {"bf16": 4 * 33_554_432 * 16 * 64}           # 137.4 GFLOP
    assert fwd.bytes == 4 * 16384 * 16 * 64 * 2 + 4 * 16384 * 16      # 9,437,184
    # compute bound: 137,438,953,472 / 989e12 s = 0.13897 ms (memory: 0.0028 ms)
    assert roofline.bound_ms(fwd, H100) == pytest.approx(0.138968, rel=1e-5)
    bwd = roofline.attention(pairs, 8 * 2048, 16, 64, 2, backward=True)
    assert bwd.flops["bf16"] == 2.5 * fwd.flops["bf16"]
    assert bwd.bytes == 8 * 16384 * 16 * 64 * 2 + 4 * 16384 * 16
    assert roofline.fraction(fwd + bwd, H100, 1.0) == pytest.approx(3.5 * 0.138968, rel=1e-5)


def test_causal_pairs_and_short_sequences_are_memory_bound():
    assert roofline.attention_pairs([3, 1], causal=True) == 6 + 1
    # one sequence of 4 tokens, H=1, Dh=16, fp32: 4*16 pairs*16 = 1024 FLOP vs 4*4*16*4 + 16 = 1040 bytes
    work = roofline.attention(16, 4, 1, 16, 4, "fp32")
    assert work.flops == {"fp32": 1024} and work.bytes == 1040
    assert roofline.bound_ms(work, H100) == pytest.approx(1040 / 3.35e12 * 1e3)


def test_mba_infonce_work():
    # B=2, L_img=3, L_txt=5, D=4, E=2, MLP hidden 4, bf16
    work = roofline.mba_infonce(2, 3, 5, 4, 2, 4, 2)
    # per tower 6*B*L*D*hidden + 6*B*hidden*E: L=3: 576 + 96, L=5: 960 + 96; InfoNCE 6*B*B*E = 48
    assert work.flops == {"bf16": 1728, "tf32": 48}
    # tokens 3 passes * B*L*D * 2 bytes = 144 + 240; weights (16 + 8) * 2 bytes read + grad written,
    # both towers = 192; embeddings 4 float32 [B, E] = 64
    assert work.bytes == 384 + 192 + 64
    linear = roofline.mba_infonce(2, 3, 5, 4, 2, None, 2)              # pooled first: m = B
    assert linear.flops["bf16"] == 192                               # 2 towers * 6*B*D*E


def test_mixed_precision_compute_adds_up():
    work = roofline.Work({"bf16": 989e9}, 0) + roofline.Work({"tf32": 494.5e9}, 0)
    assert roofline.bound_ms(work, H200) == pytest.approx(2.0)       # 1 ms + 1 ms


def test_device_choice_and_precision_names():
    assert roofline.device_for("NVIDIA H200") is H200
    assert roofline.device_for("NVIDIA H100 80GB HBM3") is H100 and roofline.device_for("x86_64") is H100
    assert roofline.matmul_precision("bfloat16") == "bf16" and roofline.matmul_precision("float32") == "fp32"
    with pytest.raises(ValueError, match="dtype_name"):
        roofline.matmul_precision("int8")
