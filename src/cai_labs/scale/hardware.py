"""GPU presets from NVIDIA's datasheets, and the one efficiency constant per GPU type.

Bandwidths are per GPU and per direction, in bytes/s: NVLink inside a node, InfiniBand across
nodes (the DGX/HGX reference design: one NIC per GPU), PCIe to the host (offload).

``efficiency`` is the fraction of the dense peak that the matrix products of a large transformer
sustain: the same for every model and layout on that GPU type, never set per row. It is the
MFU that Korthikanti et al. 2022 (Table 5) reach on A100 for their largest runs (about 0.56),
plus the bubble those runs still had; on H100, torchtitan reports 33-39 % MFU for Llama 3 8B
with FSDP (``benchmarks/llama3_h100_202412_torchtitan.md``, note 2: measured against the SXM
peak on a 500 W part), so H100 and H200 get a lower constant.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["GPU", "GPUS", "get_gpu"]

GB = 1e9


@dataclass(frozen=True)
class GPU:
    """One GPU type; ``source`` cites the datasheet."""

    name: str
    bf16_flops: float
    fp32_flops: float
    hbm_bytes: float
    hbm_bandwidth: float
    nvlink_bandwidth: float
    ib_bandwidth: float
    pcie_bandwidth: float
    gpus_per_node: int
    efficiency: float
    nvlink_latency: float = 5e-6
    ib_latency: float = 10e-6
    source: str = ""

    def peak(self, precision: str) -> float:
        """Dense peak FLOP/s for ``precision`` (``"bf16"`` tensor cores, ``"fp32"`` CUDA cores)."""
        return self.bf16_flops if precision == "bf16" else self.fp32_flops


_A100 = "NVIDIA A100 Tensor Core GPU datasheet (SXM4): 312 TFLOPS bf16 dense, 19.5 TFLOPS fp32"
_H100 = "NVIDIA H100 Tensor Core GPU datasheet (SXM5): 989 TFLOPS bf16 dense, 67 TFLOPS fp32"

GPUS: dict[str, GPU] = {
    "a100-40gb": GPU(
        "a100-40gb",
        312e12,
        19.5e12,
        40 * GB,
        1555 * GB,
        300 * GB,
        25 * GB,
        32 * GB,
        8,
        0.62,
        source=_A100 + ", 40 GB HBM2 at 1,555 GB/s, NVLink 600 GB/s (both directions), "
        "DGX A100 HDR 200 Gb/s per GPU, PCIe Gen4",
    ),
    "a100-80gb": GPU(
        "a100-80gb",
        312e12,
        19.5e12,
        80 * GB,
        2039 * GB,
        300 * GB,
        25 * GB,
        32 * GB,
        8,
        0.62,
        source=_A100 + ", 80 GB HBM2e at 2,039 GB/s, NVLink 600 GB/s (both directions), "
        "DGX A100 HDR 200 Gb/s per GPU, PCIe Gen4",
    ),
    "h100": GPU(
        "h100",
        989e12,
        67e12,
        80 * GB,
        3350 * GB,
        450 * GB,
        50 * GB,
        64 * GB,
        8,
        0.45,
        source=_H100 + ", 80 GB HBM3 at 3.35 TB/s, NVLink 900 GB/s (both directions), "
        "DGX H100 NDR 400 Gb/s per GPU, PCIe Gen5",
    ),
    "h200": GPU(
        "h200",
        989e12,
        67e12,
        141 * GB,
        4800 * GB,
        450 * GB,
        50 * GB,
        64 * GB,
        8,
        0.45,
        source="NVIDIA H200 Tensor Core GPU datasheet (SXM): 989 TFLOPS bf16 dense, "
        "67 TFLOPS fp32, 141 GB HBM3e at 4.8 TB/s, NVLink 900 GB/s, NDR 400 Gb/s per GPU",
    ),
}
GPUS["a100"] = GPUS["a100-80gb"]


def get_gpu(name: str) -> GPU:
    """A preset by name, with a clear error listing the presets."""
    try:
        return GPUS[name]
    except KeyError:
        raise ValueError(f"unknown gpu {name!r}; choose one of {sorted(GPUS)}") from None
