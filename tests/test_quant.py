"""Weight quantization: int8 per channel and fp8 block scales, at load time and from FP8 checkpoints.

What holds it:
- the quantizers' own bounds (int8: |w - dequant| <= scale / 2 per row, |q| <= 127, bf16-exact
  scales; fp8 e4m3: 3 mantissa bits, so relative error <= 2^-4 once a value is normal);
- torch's CPU int8 kernel (the bf16 serving path) against the dequantizing reference;
- whole models, fp32: expertmesh quantized at load equals transformers on a checkpoint whose
  weights were replaced by dequant(quantize(w)), computed by the tests' own dequantization
  (quant_util.py), to the fp32 tolerance of the unquantized model tests (1e-4). A scale on the
  wrong axis, a dropped scale or a misplaced block moves the logits by far more (checked below);
- an FP8 checkpoint (blocks 32x48, so blocks are partial at the edges and TP splits cut through
  them) equals transformers on its dequantized weights, and equals quantizing the original at
  load with the same blocks;
- TP=2 and EP=2 quantized give the single-rank quantized tokens and logprobs;
- weight bytes, and the errors for bad options and broken checkpoints.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from expertmesh import LLM, InvalidRequestError
from expertmesh.models.loader import load_model
from expertmesh_kernels.quant import (QuantWeight, dequantize_ref, quant_linear_cpu, int8_linear_cpu,
                                      quant_linear_ref, quantize_fp8_blocks, quantize_int8)
from model_factory import add_default_tokenizer, make_checkpoint
from quant_util import dequantize, dequantized_checkpoint, fp8_checkpoint, quantized
from test_models import ATOL, RTOL, PagedRunner, _hf_logits, _prompts, load_hf_model
from test_tensor_parallel import _assert_same, _run

BLOCK = (32, 48)


def test_int8_quantizer_bounds():
    w = torch.randn(40, 72, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 1, 40)[:, None]
    w[3] = 0.0
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127 and scale.shape == (40,)
    assert torch.equal(scale, scale.to(torch.bfloat16).float())  # exact in bf16: the kernels apply it as is
    assert scale[3] == 1 and (q[3] == 0).all()
    err = (dequantize(q, scale, None) - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-12).all()
    bound, held = w.abs().amax(1) / 127, w.abs().amax(1) > 0
    assert (scale[held] >= bound[held]).all() and (scale[held] <= bound[held] * (1 + 2**-7)).all()


def test_fp8_quantizer_bounds_and_layout():
    w = torch.randn(70, 100, generator=torch.Generator().manual_seed(1))
    q, scale = quantize_fp8_blocks(w, BLOCK)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (3, 3)  # ceil(70/32), ceil(100/48)
    assert torch.allclose(scale[1, 2], w[32:64, 96:].abs().max() / 448)  # a partial edge block
    back = dequantize(q, scale, BLOCK)
    normal = w.abs() >= 2**-6 * scale.repeat_interleave(32, 0).repeat_interleave(48, 1)[:70, :100]
    assert ((back - w).abs() <= 2**-4 * w.abs() + 1e-12)[normal].all()


def test_cpu_int8_kernel_matches_the_reference_in_bf16():
    gen = torch.Generator().manual_seed(2)
    w, x, bias = torch.randn(96, 64, generator=gen), torch.randn(7, 64, generator=gen), torch.randn(96, generator=gen)
    qw = QuantWeight("int8", *quantize_int8(w))
    got = int8_linear_cpu(x.bfloat16(), qw, bias.bfloat16()).float()
    want = quant_linear_ref(x.bfloat16(), qw, bias.bfloat16()).float()
    torch.testing.assert_close(got, want, atol=0.05, rtol=2**-7)  # both round to bf16 once or twice
    assert (got - x.bfloat16().float() @ w.T - bias).abs().max() < 0.05 * got.abs().max()


@pytest.mark.parametrize("kind", ["fp8", "int8"])
@pytest.mark.parametrize("m, n, k, col_offset", [(1, 5, 17, 0), (7, 37, 100, 32), (33, 64, 256, 5)])
def test_cpu_core_kernel_matches_the_reference(kind, m, n, k, col_offset):
    """The Rust core's quantized linear (rows dequantized 4 at a time, fp32 FMAs) against the
    reference: fp8 with blocks of 48 that a column offset shifts and edge blocks left partial,
    int8 with its per-row scales."""
    from expertmesh_kernels.cpu_attention import _core

    assert _core() is not None  # else the test would compare the reference with itself
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(n, col_offset + k, generator=gen)
    if kind == "fp8":
        q, blocks = quantize_fp8_blocks(w, (1, 48))  # one row per block: each row its own scales
        qw = QuantWeight("fp8", q[:, col_offset:].contiguous(), blocks[:, col_offset // 48:].contiguous(), 48,
                         col_offset % 48)
    else:
        qw = QuantWeight("int8", *quantize_int8(w[:, col_offset:]))
    x = torch.randn(m, k, generator=gen)
    torch.testing.assert_close(quant_linear_cpu(x, qw), quant_linear_ref(x, qw), atol=1e-4, rtol=1e-5)
    # bf16 out: the kernel's one rounding of its fp32 sum lands within half a bf16 ulp of the
    # fp32 result (plus summation-order slack); two roundings compared with each other could
    # differ by a whole ulp where the sums straddle a rounding boundary.
    got = quant_linear_cpu(x.bfloat16(), qw).float()
    exact = quant_linear_ref(x.bfloat16().float(), qw)  # [M, N] fp32
    half_ulp = torch.exp2(torch.floor(torch.log2(exact.abs().clamp_min(2**-100))) - 8)  # bf16: 7 mantissa bits
    assert ((got - exact).abs() <= half_ulp + 1e-4).all(), (got - exact).abs().max()
    with pytest.raises(ValueError, match=r"x \[T, K\] and a weight \[N, K\]"):
        quant_linear_cpu(x[:, 1:], qw)


def test_a_misapplied_scale_is_far_outside_the_tolerance():
    """The model tests' tolerance sees a scale on the wrong axis or dropped."""
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(3)) * torch.logspace(-1, 0, 64)[:, None]
    q, scale = quantize_int8(w)
    right = dequantize_ref(QuantWeight("int8", q, scale))
    wrong_axis = q.float() * scale[None, :]
    dropped = q.float()
    assert (right - dequantize(q, scale, None)).abs().max() < 1e-6
    assert (wrong_axis - right).abs().max() > 100 * ATOL and (dropped - right).abs().max() > 100 * ATOL


def _logits(model, prompts):
    runner = PagedRunner(model, max(len(p) for p in prompts), len(prompts))
    return runner.step(list(enumerate(prompts)))


ARCHS = {"mixtral": {}, "qwen2_moe": dict(num_hidden_layers=3, mlp_only_layers=[1]), "qwen3_moe": {},
         "olmoe": dict(clip_qkv=3.0)}


@pytest.mark.parametrize("kind", ["int8", "fp8"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_quantized_model_equals_transformers_on_dequantized_weights(tmp_path, arch, kind):
    src = make_checkpoint(tmp_path, arch, **ARCHS[arch])
    ref = load_hf_model(dequantized_checkpoint(src, tmp_path / "deq", kind))
    model, _ = load_model(src, dtype="float32", show_progress=False, quantization=kind)
    assert model.quant_config.method == kind
    prompts = _prompts(256, [9, 4, 13])
    for got, prompt in zip(_logits(model, prompts), prompts):
        torch.testing.assert_close(got, _hf_logits(ref, prompt), atol=ATOL, rtol=RTOL)
    plain = load_hf_model(src)  # quantizing changed something: the test above is not vacuous
    assert (_hf_logits(plain, prompts[0]) - _hf_logits(ref, prompts[0])).abs().max() > 100 * ATOL


def test_fp8_checkpoint_loads_as_stored(tmp_path):
    src = make_checkpoint(tmp_path, "qwen2_moe", num_hidden_layers=3, mlp_only_layers=[1])
    ckpt = fp8_checkpoint(src, tmp_path / "fp8", BLOCK)
    model, _ = load_model(ckpt, dtype="float32", show_progress=False)
    assert model.quant_config.format.prequantized and model.quant_config.format.block == BLOCK
    assert model.model.layers[0].mlp.w_gate_up.dtype == torch.float8_e4m3fn
    ref = load_hf_model(dequantized_checkpoint(src, tmp_path / "deq", "fp8", BLOCK))
    prompts = _prompts(256, [9, 4])
    for got, prompt in zip(_logits(model, prompts), prompts):
        torch.testing.assert_close(got, _hf_logits(ref, prompt), atol=ATOL, rtol=RTOL)


@pytest.fixture(scope="module")
def quantized_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    mixtral = make_checkpoint(root, "mixtral", vocab_size=652)
    qwen = make_checkpoint(root, "qwen2_moe", vocab_size=652, mlp_only_layers=[1])
    return {"mixtral": str(add_default_tokenizer(mixtral)),
            "qwen2_moe-fp8": str(add_default_tokenizer(fp8_checkpoint(qwen, root / "qwen-fp8", BLOCK)))}


@pytest.mark.parametrize("name, quantization, layout", [
    ("mixtral", "int8", dict(tensor_parallel_size=2)),
    ("mixtral", "int8", dict(data_parallel_size=2, enable_expert_parallel=True)),
    ("mixtral", "fp8", dict(tensor_parallel_size=2)),
    ("qwen2_moe-fp8", None, dict(tensor_parallel_size=2)),
    ("qwen2_moe-fp8", None, dict(data_parallel_size=2, enable_expert_parallel=True)),
])
def test_quantized_parallel_layouts_equal_one_rank(quantized_checkpoints, name, quantization, layout):
    path = quantized_checkpoints[name]
    with LLM(path, show_progress=False, quantization=quantization) as llm:
        want = _run(llm)
    with LLM(path, show_progress=False, quantization=quantization, **layout) as llm:
        _assert_same(_run(llm), want)


def test_weight_bytes_count_values_and_scales(quantized_checkpoints, tmp_path):
    path = quantized_checkpoints["mixtral"]
    from safetensors import safe_open

    with safe_open(f"{path}/model.safetensors", "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    full = sum(t.numel() * 4 for t in tensors.values())
    int8 = sum(t.numel() + 4 * t.shape[0] if quantized(k, t) else t.numel() * 4 for k, t in tensors.items())
    for quantization, want in ((None, full), ("int8", int8)):
        with LLM(path, show_progress=False, quantization=quantization, dtype="float32") as llm:
            stats = llm.stats()
            assert stats["weight_bytes"] == want and stats["quantization"] == quantization


def test_bad_quantization_options_and_checkpoints(quantized_checkpoints, tmp_path):
    with pytest.raises(InvalidRequestError, match=r"quantization must be one of \['int8', 'fp8'\].*'int4'") as err:
        LLM(quantized_checkpoints["mixtral"], quantization="int4")
    assert err.value.param == "quantization"
    fp8 = quantized_checkpoints["qwen2_moe-fp8"]
    with pytest.raises(InvalidRequestError, match=r"already quantized \(fp8, block \[32, 48\]\).*'int8'"):
        LLM(fp8, quantization="int8", show_progress=False)
    for field, value, fragment in (("quant_method", "gptq", "quant_method='gptq'"),
                                   ("activation_scheme", "static", "activation_scheme='static'"),
                                   ("weight_block_size", None, "weight_block_size=None")):
        bad = shutil.copytree(fp8, tmp_path / f"bad-{field}")
        config = json.loads((bad / "config.json").read_text())
        config["quantization_config"][field] = value
        (bad / "config.json").write_text(json.dumps(config))
        with pytest.raises(InvalidRequestError, match=f"{fragment}.*serves quant_method 'fp8'"):
            LLM(str(bad), show_progress=False)


def test_broken_fp8_checkpoints_name_the_weight(tmp_path):
    src = make_checkpoint(tmp_path, "mixtral")
    missing = fp8_checkpoint(src, tmp_path / "missing", BLOCK, drop_scale="model.layers.1.self_attn.o_proj.weight")
    with pytest.raises(ValueError, match=r"missing 1 weights.*model\.layers\.1\.self_attn\.o_proj\.weight_scale"):
        load_model(missing, show_progress=False)
    plain = fp8_checkpoint(src, tmp_path / "plain", BLOCK)
    shutil.copy(src / "model.safetensors", plain / "model.safetensors")  # config says fp8, weights are fp32
    with pytest.raises(ValueError, match=r"is torch.float32, but the checkpoint's quantization_config says fp8"):
        load_model(plain, show_progress=False)


def test_memory_quantization_saves_becomes_kv_blocks(quantized_checkpoints):
    """With gpu_memory_utilization the KV cache gets what the weights leave of the share."""
    from expertmesh.engine.model_runner import device_memory

    share = 40 * 2**20 / device_memory(torch.device("cpu"))  # 40 MiB for weights + KV
    got = {}
    for quantization in (None, "int8"):
        with LLM(quantized_checkpoints["mixtral"], show_progress=False, quantization=quantization, dtype="float32",
                 gpu_memory_utilization=share, max_num_seqs=10_000, max_model_len=64, block_size=16) as llm:
            stats = llm.stats()
        got[quantization] = (stats["weight_bytes"], stats["num_blocks"])
    per_block = 2 * 2 * 16 * 2 * 16 * 4  # K and V, 2 layers, 16 tokens, 2 KV heads, D 16, fp32
    budget = int(share * device_memory(torch.device("cpu")))
    for weights, blocks in got.values():
        assert blocks == (budget - weights) // per_block
    saved = got[None][0] - got["int8"][0]
    assert got["int8"][1] - got[None][1] in (saved // per_block, saved // per_block + 1) and saved > 0
    with pytest.raises(InvalidRequestError, match=r"gpu_memory_utilization .* leaves -?\d+ bytes after the weights"):
        LLM(quantized_checkpoints["mixtral"], show_progress=False, gpu_memory_utilization=1e-9)
