"""tq_vllm: TurboQuant KV-cache compression for vLLM.

The quantizer works without vLLM:

    from tq_vllm import TurboQuantizer, codebook
"""

from tq_vllm.quant.centroids import codebook
from tq_vllm.quant.quantizer import TurboCodes, TurboQuantizer

__all__ = ["TurboCodes", "TurboQuantizer", "codebook"]
__version__ = "0.1.0"
