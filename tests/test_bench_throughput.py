"""bench/train_throughput.py's diagnostics: the profile's kernel classes (the profile itself needs a GPU)."""

from __future__ import annotations

import pytest

from conftest import bench_module


@pytest.mark.parametrize("name, cls", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64", "matmul"),
    ("nvjet_tst_256x128_64x4_1x2_h_bz_coopA_NTT", "matmul"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x128", "attention"),
    ("kernel_cutlass_FlashAttentionForwardSm90_object_at_0x7f", "attention"),  # fa4: attention before cutlass
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer"),
    ("triton_tem_fused_mm_0", "matmul"),  # inductor's GEMM template (max-autotune)
    ("void fast_walsh_hadamard_kernel", "other"),
    ("triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_0", "other"),
])
def test_profile_names_what_each_kernel_does(name: str, cls: str) -> None:
    assert bench_module("train_throughput").kernel_class(name) == cls
