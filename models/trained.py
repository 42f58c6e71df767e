"""Small transformers trained with PyTorch on real labelled data (scikit-learn's ``load_digits``),
exported with ``torch.onnx.export`` the way PyTorch users export them, for tests and benchmarks.

torch is needed only to train and export (``pip install -e '.[train]'``); the exported ONNX files,
their held-out accuracy and the training log are cached in ``$ONNXSHRINK_CACHE`` (default
``~/.cache/onnxshrink``) under ``trained/``, so each model trains once per machine.

    from models.trained import trained_model, digits_inputs
    path = trained_model("digits_vit", opset=17)        # Path of the exported ONNX file
    x, y = digits_inputs("digits_vit", "test")            # list of {input name: array}, labels

Data: the 1797 8x8 grey digits of ``load_digits`` (values 0-16), one fixed permutation (seed 0), the
first 1300 for training, the remaining 497 held out (``split="test"``), as ``tests/digits_cnn.py``.

Models (``MODELS``):

- ``digits_vit``: a timm-style ViT. The image (scaled to [0, 1]) is cut into 2x2 patches by a
  strided Conv (16 tokens), a class token is prepended and a learned position embedding added;
  pre-LN blocks: ``x + proj(attn(LN(x)))`` with one fused ``qkv`` Linear reshaped to
  ``[B, N, 3, H, D]``, permuted to ``[3, B, H, N, D]``, unbound and fed to
  ``F.scaled_dot_product_attention``; ``x + fc2(GELU(fc1(LN(x))))``; final LN, the class token's
  features into a Linear head. Width 64, 4 heads, MLP 256, 3 blocks. Input ``pixel_values``
  ``[B, 1, 8, 8]``, output ``logits`` ``[B, 10]``.
- ``digits_text``: a BERT-style text encoder over the image as a token sequence: each pixel's
  value (0-16) is a token id (+2; 0 is padding, 1 the ``[CLS]`` id), read in raster order with the
  trailing zero pixels dropped, so sequences have different lengths and are padded to 65 with an
  ``attention_mask`` (1 for real tokens). Word and position embeddings (``Gather``), LayerNorm,
  post-LN blocks with separate query/key/value Linears, ``view(B, L, H, D).permute(0, 2, 1, 3)``,
  ``Q K^T / sqrt(D)`` plus the Hugging Face extended mask ``(1 - mask) * finfo.min``, softmax,
  ``P V``, permute and reshape back, the output dense; the MLP with exact (Erf) GELU; the ``[CLS]``
  token through a tanh pooler into the classifier; dropout 0.1 on the attention probabilities and
  the sublayer outputs while training, as BERT. Width 64, 4 heads, MLP 256, 2 blocks. Inputs
  ``input_ids``, ``attention_mask`` (int64 ``[B, 65]``), output ``logits``.
- ``digits_vit_s``: ``digits_vit`` at ViT-S width: 384 wide, 6 heads of 64, MLP 1536, 12 blocks,
  the same 17 tokens; its position embedding starts at std 0.5 (at timm's 0.02 the tokens are
  nearly alike at first and a 12-block ViT spends its few epochs on a plateau at chance accuracy),
  and it trains for 5 epochs only (~2 minutes of one core each).

Each is exported at opset 14 (LayerNorm decomposed into ReduceMean/Sub/Pow/Sqrt/Div) and 17 (the
fused ``LayerNormalization``) with a dynamic batch axis, by the TorchScript exporter
(``dynamo=False``), and checked: onnxruntime's outputs match torch's (max abs error <= 1e-4 of the
logits' scale) on held-out samples.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

CACHE = Path(os.environ.get("ONNXSHRINK_CACHE", Path.home() / ".cache" / "onnxshrink")) / "trained"

SEQ = 65          # digits_text: [CLS] + up to 64 pixel tokens
VOCAB = 19        # 0 padding, 1 [CLS], 2..18 pixel values 0..16

# name -> (architecture keywords, training keywords)
MODELS = {
    "digits_vit": ({"kind": "vit", "dim": 64, "heads": 4, "depth": 3, "mlp": 256},
                   {"epochs": 30, "lr": 3e-3, "batch": 64}),
    "digits_text": ({"kind": "text", "dim": 64, "heads": 4, "depth": 2, "mlp": 256},
                    {"epochs": 30, "lr": 1e-3, "batch": 64}),
    "digits_vit_s": ({"kind": "vit", "dim": 384, "heads": 6, "depth": 12, "mlp": 1536, "pos_std": 0.5},
                     {"epochs": 5, "lr": 5e-4, "batch": 64}),
}
VERSION = 1   # bump when a model or its training changes (the cache key)


# ---------------------------------------------------------------------- data (numpy only)


def digits_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8-valued float (N, 8, 8) with values 0..16, labels int64 (N,)) of ``split``:
    "train" (the first 1300 of a fixed permutation) or "test" (the 497 others)."""
    from sklearn.datasets import load_digits
    d = load_digits()
    order = np.random.default_rng(0).permutation(len(d.target))
    x, y = d.images[order].astype(np.float32), d.target[order].astype(np.int64)
    if split == "train":
        return x[:1300], y[:1300]
    if split == "test":
        return x[1300:], y[1300:]
    raise ValueError(f"split is 'train' or 'test', not {split!r}")


def text_tokens(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask), int64 (N, SEQ): [CLS], then each pixel's value + 2 in raster
    order up to the last non-zero pixel, then padding (id 0, mask 0)."""
    n = len(images)
    ids = np.zeros((n, SEQ), np.int64)
    mask = np.zeros((n, SEQ), np.int64)
    flat = images.reshape(n, -1).astype(np.int64)
    for i in range(n):
        nz = np.flatnonzero(flat[i])
        length = int(nz[-1]) + 1 if nz.size else 1
        ids[i, 0] = 1
        ids[i, 1:1 + length] = flat[i, :length] + 2
        mask[i, :1 + length] = 1
    return ids, mask


def model_inputs(name: str, images: np.ndarray) -> list[dict]:
    """One feed dict per image (batch 1) for model ``name``."""
    kind = MODELS[name][0]["kind"]
    if kind == "vit":
        x = (images / 16.0).astype(np.float32)[:, None]
        return [{"pixel_values": x[i:i + 1]} for i in range(len(x))]
    ids, mask = text_tokens(images)
    return [{"input_ids": ids[i:i + 1], "attention_mask": mask[i:i + 1]} for i in range(len(ids))]


def digits_inputs(name: str, split: str = "test") -> tuple[list[dict], np.ndarray]:
    """(feed dicts, labels) of ``split`` for model ``name``."""
    x, y = digits_arrays(split)
    return model_inputs(name, x), y


def write_digits_folders(name: str, folder, n_calib: int = 64) -> tuple[Path, Path]:
    """(calib, val) folders for ``onnxshrink optimize --calib calib --val val`` with model ``name``:
    the first ``n_calib`` training images, and the 497 held-out images with ``labels.npy`` beside
    them (the tool alternates them between selection and test). One .npy (single input) or .npz per
    sample, in file-name order."""
    folder = Path(folder)
    out = []
    for sub, (x, y) in (("calib", digits_arrays("train")), ("val", digits_arrays("test"))):
        if sub == "calib":
            x, y = x[:n_calib], y[:n_calib]
        d = folder / sub
        d.mkdir(parents=True, exist_ok=True)
        for i, f in enumerate(model_inputs(name, x)):
            if len(f) == 1:
                np.save(d / f"{i:04d}.npy", next(iter(f.values())))
            else:
                np.savez(d / f"{i:04d}.npz", **f)
        np.save(d / "labels.npy", y)
        out.append(d)
    return out[0], out[1]


def accuracy(model, feeds: list[dict], labels: np.ndarray) -> float:
    """Top-1 accuracy of an ONNX model (path or ModelProto) on ``feeds`` against ``labels``."""
    import onnxruntime as ort
    src = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    pred = [int(np.argmax(sess.run(None, f)[0])) for f in feeds]
    return float(np.mean(np.array(pred) == np.asarray(labels)))


# ---------------------------------------------------------------------- torch modules


def _modules():
    """The torch module classes (defined on first use: torch is optional)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Attention(nn.Module):       # timm's ViT attention: fused qkv, SDPA
        def __init__(self, dim, heads):
            super().__init__()
            self.heads, self.dh = heads, dim // heads
            self.qkv = nn.Linear(dim, 3 * dim)
            self.proj = nn.Linear(dim, dim)

        def forward(self, x):
            B, N, C = x.shape
            qkv = self.qkv(x).reshape(B, N, 3, self.heads, self.dh).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            x = F.scaled_dot_product_attention(q, k, v)
            return self.proj(x.transpose(1, 2).reshape(B, N, C))

    class Block(nn.Module):
        def __init__(self, dim, heads, mlp):
            super().__init__()
            self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads)
            self.norm2 = nn.LayerNorm(dim, eps=1e-6)
            self.fc1, self.fc2 = nn.Linear(dim, mlp), nn.Linear(mlp, dim)

        def forward(self, x):
            x = x + self.attn(self.norm1(x))
            return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))

    class ViT(nn.Module):
        def __init__(self, dim, heads, depth, mlp, patch=2, classes=10, pos_std=0.02):
            super().__init__()
            n = (8 // patch) ** 2
            self.patch_embed = nn.Conv2d(1, dim, patch, patch)
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
            self.pos_embed = nn.Parameter(torch.randn(1, n + 1, dim) * pos_std)
            self.blocks = nn.ModuleList(Block(dim, heads, mlp) for _ in range(depth))
            self.norm = nn.LayerNorm(dim, eps=1e-6)
            self.head = nn.Linear(dim, classes)

        def forward(self, pixel_values):
            x = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
            for b in self.blocks:
                x = b(x)
            return self.head(self.norm(x)[:, 0])

    class SelfAttention(nn.Module):   # Hugging Face BertSelfAttention + BertSelfOutput
        def __init__(self, dim, heads):
            super().__init__()
            self.heads, self.dh = heads, dim // heads
            self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
            self.dense = nn.Linear(dim, dim)
            self.norm = nn.LayerNorm(dim, eps=1e-12)
            self.drop = nn.Dropout(0.1)

        def split(self, x):
            return x.view(x.size(0), x.size(1), self.heads, self.dh).permute(0, 2, 1, 3)

        def forward(self, x, ext_mask):
            q, k, v = self.split(self.query(x)), self.split(self.key(x)), self.split(self.value(x))
            s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.dh) + ext_mask
            c = torch.matmul(self.drop(torch.softmax(s, dim=-1)), v).permute(0, 2, 1, 3).contiguous()
            c = c.view(c.size(0), c.size(1), self.heads * self.dh)
            return self.norm(self.drop(self.dense(c)) + x)

    class Layer(nn.Module):
        def __init__(self, dim, heads, mlp):
            super().__init__()
            self.attention = SelfAttention(dim, heads)
            self.intermediate, self.output = nn.Linear(dim, mlp), nn.Linear(mlp, dim)
            self.norm = nn.LayerNorm(dim, eps=1e-12)
            self.drop = nn.Dropout(0.1)

        def forward(self, x, ext_mask):
            x = self.attention(x, ext_mask)
            return self.norm(self.drop(self.output(F.gelu(self.intermediate(x)))) + x)

    class TextEncoder(nn.Module):
        def __init__(self, dim, heads, depth, mlp, classes=10):
            super().__init__()
            self.word_embeddings = nn.Embedding(VOCAB, dim, padding_idx=0)
            self.position_embeddings = nn.Embedding(SEQ, dim)
            self.register_buffer("position_ids", torch.arange(SEQ)[None], persistent=False)
            self.emb_norm = nn.LayerNorm(dim, eps=1e-12)
            self.layers = nn.ModuleList(Layer(dim, heads, mlp) for _ in range(depth))
            self.pooler = nn.Linear(dim, dim)
            self.classifier = nn.Linear(dim, classes)

        def forward(self, input_ids, attention_mask):
            pos = self.position_ids[:, :input_ids.size(1)]
            x = self.emb_norm(self.word_embeddings(input_ids) + self.position_embeddings(pos))
            ext = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
            for layer in self.layers:
                x = layer(x, ext)
            return self.classifier(torch.tanh(self.pooler(x[:, 0])))

    return {"vit": ViT, "text": TextEncoder}


def build_torch(name: str):
    """An untrained torch module of model ``name`` (seeded)."""
    import torch
    arch = dict(MODELS[name][0])
    kind = arch.pop("kind")
    torch.manual_seed(0)
    return _modules()[kind](**arch)


def _tensors(name: str, split: str):
    import torch
    x, y = digits_arrays(split)
    if MODELS[name][0]["kind"] == "vit":
        return (torch.from_numpy((x / 16.0).astype(np.float32)[:, None]),), torch.from_numpy(y)
    ids, mask = text_tokens(x)
    return (torch.from_numpy(ids), torch.from_numpy(mask)), torch.from_numpy(y)


def train_torch(name: str, log=print):
    """Train model ``name`` on the training split (AdamW, cosine schedule with warm-up, label
    smoothing 0.1, fixed seeds, one thread);
    returns (module in eval mode, test accuracy, seconds)."""
    import time

    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    torch.set_num_threads(1)   # faster than 2 on these small matrices (and the machine is shared)
    model = build_torch(name)
    hp = MODELS[name][1]
    xs, y = _tensors(name, "train")
    xt, yt = _tensors(name, "test")
    steps_per_epoch = math.ceil(len(y) / hp["batch"])
    total = hp["epochs"] * steps_per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=hp["lr"], weight_decay=0.05)
    warm = steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for epoch in range(hp["epochs"]):
        model.train()
        order = torch.randperm(len(y), generator=gen)
        for s in range(0, len(y), hp["batch"]):
            idx = order[s:s + hp["batch"]]
            feed = [t[idx] for t in xs]
            loss = F.cross_entropy(model(*feed), y[idx], label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if log and ((epoch + 1) % max(1, hp["epochs"] // 6) == 0 or epoch == hp["epochs"] - 1):
            log(f"{name} epoch {epoch + 1}: loss {loss.item():.3f}, test accuracy {_torch_acc(model, xt, yt):.4f}, "
                f"{time.perf_counter() - t0:.0f} s")
    model.eval()
    return model, _torch_acc(model, xt, yt), time.perf_counter() - t0


def _torch_acc(model, xs, y) -> float:
    import torch
    was = model.training
    model.eval()
    with torch.no_grad():
        pred = model(*xs).argmax(1)
    model.train(was)
    return float((pred == y).float().mean())


def export(model, name: str, path: Path, opset: int) -> None:
    """``torch.onnx.export`` (TorchScript exporter) at ``opset`` with a dynamic batch axis."""
    import torch
    kind = MODELS[name][0]["kind"]
    if kind == "vit":
        args, names = (torch.zeros(1, 1, 8, 8),), ["pixel_values"]
    else:
        args, names = (torch.ones(1, SEQ, dtype=torch.int64), torch.ones(1, SEQ, dtype=torch.int64)), \
            ["input_ids", "attention_mask"]
    axes = {n: {0: "batch"} for n in names + ["logits"]}
    torch.onnx.export(model, args, str(path), input_names=names, output_names=["logits"], dynamic_axes=axes,
                      opset_version=opset, dynamo=False, do_constant_folding=True)


def check_export(model, name: str, path: Path, n: int = 32) -> float:
    """Max abs difference between onnxruntime and torch on ``n`` held-out samples (batch 1 and a
    batch of ``n``), relative to the logits' scale; raises when above 1e-4."""
    import onnxruntime as ort
    import torch
    xt, _ = _tensors(name, "test")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    with torch.no_grad():
        ref = model(*(t[:n] for t in xt)).numpy()
    got = sess.run(None, {k: t[:n].numpy() for k, t in zip(names, xt)})[0]
    one = np.concatenate([sess.run(None, {k: t[i:i + 1].numpy() for k, t in zip(names, xt)})[0] for i in range(n)])
    err = float(max(np.abs(got - ref).max(), np.abs(one - ref).max()) / np.abs(ref).max())
    if err > 1e-4:
        raise RuntimeError(f"{path.name}: onnxruntime differs from torch by {err:.2e} of the logits' scale")
    return err


def _paths(name: str) -> dict:
    d = CACHE / f"{name}-v{VERSION}"
    return {"dir": d, 14: d / f"{name}_opset14.onnx", 17: d / f"{name}_opset17.onnx", "info": d / "info.json"}


def is_cached(name: str, opset: int = 17) -> bool:
    """Whether model ``name`` at ``opset`` is already in the cache (no torch needed to use it)."""
    return _paths(name)[opset].exists()


def trained_model(name: str, opset: int = 17, log=print) -> Path:
    """Path of model ``name`` exported at ``opset`` (14 or 17); trains and exports both opsets on
    first use (needs torch), then reads the cache."""
    if name not in MODELS:
        raise KeyError(f"unknown trained model {name!r}; one of {sorted(MODELS)}")
    p = _paths(name)
    if not p[opset].exists():
        _train_and_export(name, log)
    return p[opset]


def trained_info(name: str) -> dict:
    """What training recorded: torch test accuracy, seconds, parameters, export errors."""
    trained_model(name)
    return json.loads(_paths(name)["info"].read_text())


def _train_and_export(name: str, log) -> None:
    import torch
    p = _paths(name)
    p["dir"].mkdir(parents=True, exist_ok=True)
    model, acc, secs = train_torch(name, log)
    info = {"name": name, "torch": torch.__version__, "test_accuracy": acc, "train_seconds": round(secs, 1),
            "params": sum(int(v.numel()) for v in model.parameters()), "arch": MODELS[name][0],
            "train": MODELS[name][1]}
    for opset in (14, 17):
        tmp = p[opset].with_suffix(".tmp.onnx")
        export(model, name, tmp, opset)
        info[f"export_err_opset{opset}"] = check_export(model, name, tmp)
        os.replace(tmp, p[opset])
    p["info"].write_text(json.dumps(info, indent=1))
    if log:
        log(f"{name}: test accuracy {acc:.4f} after {secs:.0f} s of training; exported to {p['dir']}")


def main(argv=None) -> int:
    import argparse
    ap = argparse.ArgumentParser(description="Train and export the digits transformers (cached).")
    ap.add_argument("names", nargs="*", default=list(MODELS))
    a = ap.parse_args(argv)
    for n in a.names:
        print(n, trained_model(n), trained_info(n))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
