"""Research-size model flavors, added to torchtitan's own tables.

``llama3`` ``125M``: dim 768, 12 blocks, 12 heads, vocab 16,384 (``tokenizer-bpe16k``):
the size of the NITP-vs-NTP comparison in ``scripts/experiments/nitp_vs_ntp.sh``, about
110M parameters with its embeddings. ``1B``: dim 2048, 16 blocks, 16 heads (8 KV heads),
same vocabulary, about 0.9B parameters: the larger size of ``scripts/bench.py``.
"""

from torchtitan.models.llama3 import llama3_args
from torchtitan.models.llama3.model.args import TransformerModelArgs

FLAVORS = {
    ("llama3", "125M"): TransformerModelArgs(
        dim=768, n_layers=12, n_heads=12, vocab_size=16384, rope_theta=500000
    ),
    ("llama3", "1B"): TransformerModelArgs(
        dim=2048, n_layers=16, n_heads=16, n_kv_heads=8, vocab_size=16384, rope_theta=500000
    ),
}

_TABLES = {"llama3": llama3_args}


def register_flavors() -> None:
    for (model, flavor), args in FLAVORS.items():
        _TABLES[model].setdefault(flavor, args)
