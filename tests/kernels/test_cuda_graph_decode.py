"""The Triton decode captured in a CUDA graph and replayed (GPU only: graphs need CUDA).

With TQ_VLLM_CUDA_GRAPHS=full, vLLM captures decode-only steps whole at its maximum length
(the metadata's max_seq_len, which sizes the splits), replays them for whatever lengths later
steps hold, and pads a batch with requests of length 0. Here: capture with short lengths and a
long max_seq_len, lengthen the sequences in the captured seq_lens tensor, replay, and compare
with the reference at the new lengths; the padded request reads nothing (output 0).
Tolerance: test_triton_decode.py's.
"""

import pytest
import torch
from cases import DEVICE, make_cache

from tq_vllm.kernels.common import CODEBOOKS
from tq_vllm.kernels.decode.reference import decode_attention_reference
from tq_vllm.kernels.decode.triton_decode import decode_attention
from tq_vllm.record.codec import LayerCodec
from tq_vllm.record.layout import RecordLayout

pytestmark = pytest.mark.skipif(
    DEVICE.type != "cuda", reason="CUDA graphs need a GPU (TRITON_INTERPRET=0 on a CUDA machine)"
)


@pytest.mark.parametrize("codebook", CODEBOOKS)
def test_decode_replays_for_longer_sequences(codebook):
    d, hq, hk, scale = 128, 8, 2, 128**-0.5
    layout = RecordLayout(d, 4, "mse", 4)
    codec = LayerCodec(layout, seed=0)
    lens = [700, 1500, 300]
    cache, table, _, _ = make_cache(codec, lens, 16, hk, seed=5)
    table = torch.cat([table, torch.zeros_like(table[:1])])  # the padded request's row
    query = torch.randn(len(lens) + 1, hq, d, generator=torch.Generator().manual_seed(6))
    final = torch.tensor([*lens, 0], dtype=torch.int32)

    q, kv, block_table = query.to(DEVICE), cache.to(DEVICE), table.to(DEVICE)
    seq_lens = torch.tensor([1, 2, 3, 0], dtype=torch.int32, device=DEVICE)  # at capture
    device_codec = LayerCodec(layout, 0, DEVICE)

    def decode() -> torch.Tensor:
        return decode_attention(
            q, kv, block_table, seq_lens, device_codec, scale, max_seq_len=2048,
            codebook=codebook,
        )  # fmt: skip

    side = torch.cuda.Stream()  # warm-up (compiles) off the capture, as vLLM does
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        decode()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode()
    seq_lens.copy_(final.to(DEVICE))
    graph.replay()
    torch.cuda.synchronize()
    ref = decode_attention_reference(query[:3], cache, table[:3], final[:3], codec, scale)
    torch.testing.assert_close(out[:3].cpu().float(), ref, atol=2e-3, rtol=2e-3)
    assert bool((out[3] == 0).all()), "the padded request must read nothing"
