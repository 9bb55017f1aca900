"""Train the embedded default model from scratch on generated scenes, within a wall-clock budget.

    python scripts/train_embedded.py --out runs/embedded --max-minutes 8.5      # the real run (one H100)
    python scripts/train_embedded.py --out /tmp/smoke --smoke                   # a tiny end-to-end check on a CPU
    python scripts/train_embedded.py --out runs/stage2 --init-from runs/embedded --question-share 0.4 \
        --first-seed 2000000 --lr 5e-4 --max-minutes 4.3                        # continue training, more questions

Training scenes are seeds TRAIN_SEED_START + i (each seen once); the held-out loss is measured on the reference
captions of held-out seeds 0..held_out-1. The script stops training when the budget (minus a reserve for the final
evaluation and saving) is spent, then writes the model directory: weights (fp16 on disk, loaded as float32 by
default), processor, and training_log.json with the loss curves, greedy captions of held-out scenes and their metric.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch

from neverfade.scenes import TRAIN_SEED_START, make_scene, scene_metrics
from neverfade.scenes.examples import (
    DESCRIBE_PROMPTS,
    QUESTION_SHARE,
    ExampleEncoder,
    pixel_values,
    question,
    tokenizer_corpus,
    user_message,
    yes_no_questions,
)
from neverfade.scenes.model import build_model, build_processor


class SceneBatches(torch.utils.data.IterableDataset):
    """Batch b holds the examples of seeds first_seed + b*batch_size + (0..batch_size-1); workers interleave."""

    def __init__(self, encoder: ExampleEncoder, batch_size: int, pad_id: int, first_seed: int):
        self.encoder, self.batch_size, self.pad_id, self.first_seed = encoder, batch_size, pad_id, first_seed

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for b in range(worker, 10**9, workers):
            start = self.first_seed + b * self.batch_size
            yield collate([self.encoder.example(s) for s in range(start, start + self.batch_size)], self.pad_id)


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch (training needs no left padding: every position's loss is computed in one pass)."""
    length = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(e["input_ids"]), torch.tensor(e["labels"]), 1
    pixels = torch.from_numpy(np.stack([e["pixel_values"] for e in examples]))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": pixels}


def held_out_batches(encoder: ExampleEncoder, n: int, batch_size: int, pad_id: int) -> list[dict]:
    """Reference captions of held-out seeds 0..n-1 under the main prompt."""
    examples = []
    for seed in range(n):
        scene = make_scene(seed)
        ids, labels = encoder.encode(DESCRIBE_PROMPTS[0], scene.caption)
        examples.append({"pixel_values": pixel_values(scene.image), "input_ids": ids, "labels": labels})
    return [collate(examples[i : i + batch_size], pad_id) for i in range(0, n, batch_size)]


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def held_out_loss(model, batches, device, autocast) -> float:
    model.eval()
    total = count = 0.0
    for batch in batches:
        with autocast():
            loss = model(**to_device(batch, device)).loss
        n = int((batch["labels"][:, 1:] != -100).sum())
        total, count = total + float(loss) * n, count + n
    model.train()
    return total / count


@torch.no_grad()
def sample_captions(model, processor, seeds, device, max_new_tokens, batch_size=64) -> list[str]:
    model.eval()
    text = processor.apply_chat_template(user_message(DESCRIBE_PROMPTS[0]), add_generation_prompt=True)
    captions = []
    for i in range(0, len(seeds), batch_size):
        chunk = seeds[i : i + batch_size]
        inputs = processor(
            text=[text] * len(chunk), images=[make_scene(s).image for s in chunk], return_tensors="pt", padding=True
        ).to(device)
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        captions += [
            c.strip() for c in processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        ]
    model.train()
    return captions


@torch.no_grad()
def yes_no_accuracy(model, processor, seeds, device) -> dict:
    """Accuracy on `yes_no_questions` of held-out scenes: present, adversarial (absent partner), random absent."""
    model.eval()
    results: dict[str, list[bool]] = {"present": [], "absent_partner": [], "absent_random": []}
    for seed in seeds:
        scene = make_scene(seed)
        probes = yes_no_questions(scene, np.random.default_rng([seed, 2]))
        texts = [
            processor.apply_chat_template(user_message(question(kind)), add_generation_prompt=True)
            for kind, _ in probes
        ]
        inputs = processor(text=texts, images=[scene.image] * len(probes), return_tensors="pt", padding=True).to(device)
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
        answers = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        for i, ((_, present), answer) in enumerate(zip(probes, answers)):
            group = "present" if present else ("absent_random" if i == 1 else "absent_partner")
            results[group].append(answer.strip().lower().startswith("yes") == present)
    model.train()
    return {k: round(float(np.mean(v)), 4) for k, v in results.items() if v}


def lr_at(progress: float, step: int, peak: float, warmup_steps: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak over the time budget (progress in [0, 1])."""
    warm = min(1.0, (step + 1) / warmup_steps)
    return peak * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="model directory to write")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script end to end on a CPU")
    p.add_argument("--max-minutes", type=float, default=8.5, help="wall-clock budget for the whole script")
    p.add_argument("--max-steps", type=int, default=10**9, help="stop after this many steps (tests)")
    p.add_argument("--reserve-minutes", type=float, default=0.8, help="kept for the final evaluation and saving")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=150)
    p.add_argument("--workers", type=int, default=15)
    p.add_argument("--eval-every-s", type=float, default=60.0, help="held-out loss every this many seconds")
    p.add_argument("--held-out", type=int, default=256, help="held-out scenes for the loss")
    p.add_argument("--sample-scenes", type=int, default=100, help="held-out scenes captioned at the end")
    p.add_argument("--tokenizer-scenes", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0, help="torch seed (initialisation)")
    p.add_argument("--init-from", type=Path, default=None, help="continue from this model directory")
    p.add_argument("--first-seed", type=int, default=TRAIN_SEED_START, help="first training scene")
    p.add_argument("--question-share", type=float, default=QUESTION_SHARE, help="share of yes/no examples")
    p.add_argument("--question-scenes", type=int, default=200, help="held-out scenes probed with questions")
    args = p.parse_args(argv)
    if args.smoke:
        args.__dict__.update(
            batch_size=4,
            workers=min(args.workers, 1),
            held_out=8,
            sample_scenes=2,
            question_scenes=2,
            tokenizer_scenes=200,
            eval_every_s=5.0,
            warmup_steps=2,
            max_minutes=min(args.max_minutes, 1.0),
            reserve_minutes=0.3,
        )
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    start = time.time()
    deadline = start + 60 * (args.max_minutes - args.reserve_minutes)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    if args.init_from:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        processor = AutoProcessor.from_pretrained(args.init_from)
        model = AutoModelForImageTextToText.from_pretrained(args.init_from, dtype=torch.float32).to(device)
        previous = json.loads((args.init_from / "training_log.json").read_text())
    else:
        processor = build_processor(tokenizer_corpus(range(TRAIN_SEED_START - args.tokenizer_scenes, TRAIN_SEED_START)))
        model = build_model(processor).to(device)
        previous = None
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    pad_id = processor.tokenizer.pad_token_id
    encoder = ExampleEncoder(processor, args.question_share)
    held_out = held_out_batches(encoder, args.held_out, 64, pad_id)
    print(
        f"{n_params / 1e6:.2f}M parameters, vocabulary {len(processor.tokenizer)}, device {device}, "
        f"setup {time.time() - start:.1f}s",
        flush=True,
    )

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    loader = torch.utils.data.DataLoader(
        SceneBatches(encoder, args.batch_size, pad_id, args.first_seed),
        batch_size=None,
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if args.workers else None,
    )
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
        fused=device.type == "cuda",
    )

    log = {"train": [], "held_out": []}
    train_start = time.time()
    last_eval, window, wait, step = train_start, [], 0.0, 0
    fetched = time.time()
    for step, batch in enumerate(loader):
        wait += time.time() - fetched
        now = time.time()
        if now >= deadline or step >= args.max_steps:
            break
        lr = lr_at((now - train_start) / max(deadline - train_start, 1e-9), step, args.lr, args.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast():
            loss = model(**to_device(batch, device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        window.append(loss.detach())
        if (step + 1) % 50 == 0 or args.smoke:
            elapsed = time.time() - train_start
            entry = {
                "step": step + 1,
                "seconds": round(elapsed, 1),
                "lr": round(lr, 6),
                "data_wait_s": round(wait, 1),
                "loss": round(float(torch.stack(window).mean()), 4),
            }
            log["train"].append(entry)
            print(json.dumps(entry), flush=True)
            window = []
        if time.time() - last_eval >= args.eval_every_s:
            entry = {
                "step": step + 1,
                "seconds": round(time.time() - train_start, 1),
                "loss": round(held_out_loss(model, held_out, device, autocast), 4),
            }
            log["held_out"].append(entry)
            print("held-out", json.dumps(entry), flush=True)
            last_eval = time.time()
        fetched = time.time()
    train_seconds = time.time() - train_start
    steps = step

    final_loss = held_out_loss(model, held_out, device, autocast)
    log["held_out"].append({"step": steps, "seconds": round(train_seconds, 1), "loss": round(final_loss, 4)})
    print(
        f"trained {steps} steps ({steps * args.batch_size} scenes) in {train_seconds:.0f}s; "
        f"held-out loss {final_loss:.4f}",
        flush=True,
    )

    seeds = list(range(args.sample_scenes))
    captions = sample_captions(model, processor, seeds, device, max_new_tokens=20 if args.smoke else 400)
    metrics = scene_metrics(captions, [make_scene(s) for s in seeds])
    print({k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)}, flush=True)
    yes_no = yes_no_accuracy(model, processor, list(range(args.question_scenes)), device)
    print("yes/no accuracy", yes_no, flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    model = model.float().cpu()
    model.save_pretrained(args.out, state_dict={k: v.half() for k, v in model.state_dict().items()})
    processor.save_pretrained(args.out)
    log.update(
        {
            "command": "python scripts/train_embedded.py " + " ".join(a for a in (argv or [])),
            "args": {k: str(v) for k, v in vars(args).items()},
            "parameters": n_params,
            "steps": steps,
            "scenes_seen": steps * args.batch_size,
            "train_seconds": round(train_seconds, 1),
            "total_seconds": round(time.time() - start, 1),
            "final_held_out_loss": round(final_loss, 4),
            "held_out_seeds": f"0..{args.held_out - 1}",
            "train_seeds": f"{args.first_seed}..{args.first_seed + steps * args.batch_size - 1}",
            "greedy_held_out": {
                "seeds": f"0..{len(seeds) - 1}",
                "prompt": DESCRIBE_PROMPTS[0],
                **{k: v for k, v in metrics.items() if k != "per_caption"},
                "samples": [{"seed": s, "caption": c} for s, c in zip(seeds[:5], captions[:5])],
            },
            "yes_no_held_out": {"seeds": f"0..{args.question_scenes - 1}", **yes_no},
            "previous_stage": previous,
            "environment": {
                "torch": torch.__version__,
                "transformers": __import__("transformers").__version__,
                "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
                "python": platform.python_version(),
            },
        }
    )
    (args.out / "training_log.json").write_text(json.dumps(log, indent=1))
    print(f"saved {args.out} in {time.time() - start:.0f}s total", flush=True)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
