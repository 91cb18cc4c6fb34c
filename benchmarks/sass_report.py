"""Static figures of the Triton decode kernel for sm_90, from its SASS, on a machine without a GPU.

    python benchmarks/sass_report.py [--json]

Per variant (head_dim 64/128, K/V bits 3/3, 4/4, 6/5, GQA 1/4/8) and codebook (decode_attention's
"memory" gathers and "registers" byte permutes) it compiles the split kernel that
decode_attention launches (tq_vllm.tools.cuda_compile) and reports:
  - registers, spills (local memory bytes per thread) and shared memory, from the cubin;
  - resident warps per SM: the fewest blocks that the registers (64K per SM, allocated per
    warp in units of 256), the shared memory (228 KiB per SM, 1 KiB reserved per block), the
    warp slots (64) and the block slots (32) allow, times the warps per block;
  - warp-instructions issued per (token, KV head) in the steady state: the SASS instructions
    of the tile loop (the longest backward branch) x warps per program / tokens per tile;
  - global loads issued per (token, KV head) in that loop (LDG: the memory codebook's centroid
    gathers are most of them; LDGSTS, the pipelined record copies, not counted);
  - bytes of KV requested per SM in flight: resident programs x tiles in flight x bytes per
    tile (tokens x record bytes); a tile loop with asynchronous copies (LDGSTS) keeps num_stages
    tiles in flight, one without keeps one.
An H200 issues about 1.05e12 warp-instructions/s (132 SMs x 4 schedulers x ~1.98 GHz) and
needs ~20-32 KB in flight per SM to keep ~4 TB/s busy (Little's law at ~600 ns).
Needs torch and triton; TRITON_INTERPRET must be unset.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from tq_vllm.kernels.decode.triton_decode import CODEBOOKS, decode_attention
from tq_vllm.record.codec import LayerCodec
from tq_vllm.record.layout import RecordLayout
from tq_vllm.tools.cuda_compile import build, record_calls, sass_instructions

REGISTERS_PER_SM, REGISTER_UNIT, SHARED_PER_SM, SHARED_RESERVED = 65536, 256, 233472, 1024
WARPS_PER_SM, BLOCKS_PER_SM = 64, 32
VARIANTS = [
    (head_dim, key_bits, value_bits, gqa, codebook)
    for head_dim in (64, 128)
    for key_bits, value_bits in ((3, 3), (4, 4), (6, 5))
    for gqa in (1, 4, 8)
    for codebook in CODEBOOKS
]


def decode_launch(head_dim: int, key_bits: int, value_bits: int, gqa: int, codebook: str) -> tuple:
    """(kernel, args, kwargs, record bytes) of the split kernel decode_attention launches."""
    codec = LayerCodec(RecordLayout(head_dim, key_bits, "mse", value_bits), seed=0)
    hk = 8
    cache = torch.zeros(8, hk, 16, codec.layout.record_bytes, dtype=torch.uint8)
    query = torch.zeros(2, hk * gqa, head_dim, dtype=torch.bfloat16)
    table = torch.zeros(2, 4, dtype=torch.int32)
    lens = torch.tensor([40, 20], dtype=torch.int32)
    call = lambda: decode_attention(
        query, cache, table, lens, codec, 0.1, num_splits=1, codebook=codebook
    )
    ((_, kernel, args, kwargs),) = record_calls({"decode": call})
    return kernel, args, kwargs, codec.layout.record_bytes


def tile_loop(sass: str) -> list[str]:
    """The instructions of the longest loop: from a backward branch's target to the branch."""
    instructions = sass_instructions(sass)
    best: list[str] = []
    for address, text in instructions:
        target = text.split("BRA", 1)[1].strip() if "BRA" in text else ""
        if target.startswith("0x") and int(target, 16) < address:
            body = [t for a, t in instructions if int(target, 16) <= a <= address]
            best = max(best, body, key=len)
    return best


def opcode(instruction: str) -> str:
    """'@!P0 LDG.E.U8 R4, desc[UR4][R2.64]' -> 'LDG'."""
    words = instruction.split()
    return words[1 if words[0].startswith("@") else 0].split(".")[0]


def report(head_dim: int, key_bits: int, value_bits: int, gqa: int, codebook: str) -> dict:
    kernel, args, kwargs, record_bytes = decode_launch(
        head_dim, key_bits, value_bits, gqa, codebook
    )
    compiled, usage, sass = build(kernel, args, kwargs, 90)
    warps = compiled.metadata.num_warps
    shared = usage["SHARED"] + compiled.metadata.shared
    per_warp = -(-usage["REG"] * 32 // REGISTER_UNIT) * REGISTER_UNIT
    blocks = min(
        REGISTERS_PER_SM // (per_warp * warps),
        SHARED_PER_SM // (shared + SHARED_RESERVED),
        WARPS_PER_SM // warps,
        BLOCKS_PER_SM,
    )
    loop = tile_loop(sass)
    tokens = kwargs["BLOCK_N"]
    stages = kwargs["num_stages"] if any("LDGSTS" in t for t in loop) else 1
    return dict(
        kernel="decode",
        head_dim=head_dim,
        key_bits=key_bits,
        value_bits=value_bits,
        gqa=gqa,
        codebook=codebook,
        registers=usage["REG"],
        spills=usage["LOCAL"] + usage["STACK"],
        shared_bytes=shared,
        resident_warps_per_sm=blocks * warps,
        loop_instructions=len(loop),
        issue_per_token_head=len(loop) * warps / tokens,
        loads_per_token_head=sum(opcode(t) == "LDG" for t in loop) * warps / tokens,
        bytes_in_flight_per_sm=blocks * stages * tokens * record_bytes,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print a JSON list instead")
    args = parser.parse_args(argv)
    rows = [report(*variant) for variant in VARIANTS]
    if args.json:
        print(json.dumps(rows))
        return 0
    print(
        "| head_dim | K/V bits | GQA | codebook | registers | spills | shared KiB | warps/SM "
        "| loop instr. | warp-instr. per (token, KV head) | LDG per (token, KV head) "
        "| KB in flight per SM |"
    )
    print("|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['head_dim']} | K{r['key_bits']} V{r['value_bits']} | {r['gqa']} | "
            f"{r['codebook']} | "
            f"{r['registers']} | {r['spills']} | {r['shared_bytes'] / 1024:.1f} | "
            f"{r['resident_warps_per_sm']} | {r['loop_instructions']} | "
            f"{r['issue_per_token_head']:.0f} | {r['loads_per_token_head']:.1f} | "
            f"{r['bytes_in_flight_per_sm'] / 1000:.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
