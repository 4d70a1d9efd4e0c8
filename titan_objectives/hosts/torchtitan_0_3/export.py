"""torchtitan 0.3 models as Hugging Face ``transformers`` models: rebuilt from a run's
record, converted by torchtitan's own state-dict adapter, described by a ``config.json``
of the transformers class with the same computation."""

import importlib
from collections.abc import Callable
from typing import Any

import torch

from titan_objectives.hosts.common.hf_export import (
    ExportableModel,
    Logits,
    Shapes,
    check_exportable,
    refuse_routing,
    settings_of,
    without_routing_bias,
)
from titan_objectives.hosts.common.run_record import ExportError, RunRecord, overlay

HOST = "torchtitan_0_3"
DENSE_FFN = "layers.0.feed_forward.w1.weight"  # its rows: the SwiGLU width


def _decoder(config: Any) -> dict[str, Any]:
    """What every decoder's ``config.json`` says the same way."""
    attention = config.layers[0].attention
    return {
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "num_hidden_layers": len(config.layers),
        "num_attention_heads": attention.n_heads,
        "num_key_value_heads": attention.n_kv_heads or attention.n_heads,
        "head_dim": attention.head_dim or config.dim // attention.n_heads,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm.eps,
        "tie_word_embeddings": config.enable_weight_tying,
        "attention_bias": False,
    }


def _llama3(config: Any, shapes: Shapes) -> dict[str, Any]:
    rope = config.layers[0].attention.rope
    if rope.scaling not in ("llama", "none"):
        raise ExportError(
            f"model llama3 with rope scaling {rope.scaling!r}: transformers' Llama takes "
            "'llama' (Llama 3's) or 'none'"
        )
    scaling = {"rope_type": "default"}
    if rope.scaling == "llama":
        scaling = {
            "rope_type": "llama3",
            "factor": rope.scaling_factor,
            "low_freq_factor": rope.low_freq_factor,
            "high_freq_factor": rope.high_freq_factor,
            "original_max_position_embeddings": rope.original_max_position_embeddings,
        }
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **_decoder(config),
        "intermediate_size": shapes[DENSE_FFN][0],
        "rope_parameters": {**scaling, "rope_theta": float(rope.theta)},
        "mlp_bias": False,
    }


def _qwen3_moe(config: Any) -> dict[str, Any]:
    """Qwen3MoE routes every layer's tokens by softmax scores, weights the experts'
    outputs, and has no shared experts, groups, bias or scale: a run must too."""
    moes = [layer.moe for layer in config.layers]
    if any(moe is None for moe in moes):
        raise ExportError("model qwen3 with dense and MoE blocks: Qwen3MoE's are all MoE here")
    moe = moes[0]
    router = moe.router
    refused = {
        "score_func": router.score_func != "softmax",
        "route_scale": router.route_scale != 1.0,
        "num_expert_groups": router.num_expert_groups is not None,
        "_debug_force_load_balance": router._debug_force_load_balance,
    }
    wrong = settings_of("router.", router, refused)
    if router.gate.bias:
        wrong.append("router.gate.bias = True")
    if moe.shared_experts is not None:
        wrong.append("shared_experts")
    refuse_routing("qwen3 with MoE", "Qwen3MoE", wrong)
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "moe_intermediate_size": moe.routed_experts.inner_experts.hidden_dim,
        "intermediate_size": moe.routed_experts.inner_experts.hidden_dim,  # unused: no dense
        "num_experts": moe.num_experts,
        "num_experts_per_tok": router.top_k,
        "norm_topk_prob": router.route_norm,
        "decoder_sparse_step": 1,  # every block is a MoE block
        "mlp_only_layers": [],
    }


def _qwen3(config: Any, shapes: Shapes) -> dict[str, Any]:
    layer = config.layers[0]
    if layer.attention.qk_norm is None:
        raise ExportError("model qwen3 without qk_norm: transformers' Qwen3 always has it")
    moe = any(block.moe is not None for block in config.layers)
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        **_decoder(config),
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": float(layer.attention.rope.theta),
        },
        "use_sliding_window": False,
        **(_qwen3_moe(config) if moe else {"intermediate_size": shapes[DENSE_FFN][0]}),
    }


# Model name -> config.json of the transformers class that computes what it does.
HF_CONFIGS: dict[str, Callable[[Any, Shapes], dict[str, Any]]] = {
    "llama3": _llama3,
    "qwen3": _qwen3,
}


def _model_spec(record: RunRecord) -> Any:
    models = importlib.import_module(f"torchtitan.models.{record.model_name}")
    flavors = getattr(models, f"{record.model_name}_configs", {})
    if record.flavor not in flavors:
        raise ExportError(
            f"the run's model {record.model_name} flavor {record.flavor!r} is not in this "
            f"torchtitan; its flavors: {', '.join(flavors)}"
        )
    return models.model_registry(record.flavor)


def exportable(record: RunRecord) -> ExportableModel:
    check_exportable(record, HOST, list(HF_CONFIGS))
    spec = _model_spec(record)
    config = overlay(spec.model, record.model_args)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in config.build().state_dict().items()}
    adapter = spec.state_dict_adapter(config, None)

    def hf_config(token_ids: dict[str, int]) -> dict[str, Any]:
        return {**HF_CONFIGS[record.model_name](config, shapes), **token_ids}

    def logits_of(state: dict[str, torch.Tensor]) -> Logits:
        with torch.device("meta"):
            model = config.build()
        model.to_empty(device="cpu")
        with torch.no_grad():
            model.init_states(buffer_device=torch.device("cpu"))
        model.load_state_dict(state)

        def logits(tokens: torch.Tensor) -> torch.Tensor:
            # One document per row: positions from 0, the masks torchtitan's step makes.
            positions = torch.arange(tokens.shape[1]).expand_as(tokens)
            masks = model.get_attention_masks(positions=positions)
            return model(tokens, positions=positions, attention_masks=masks)

        return logits

    return ExportableModel(shapes, without_routing_bias(adapter.to_hf), hf_config, logits_of)
