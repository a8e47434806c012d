"""The one sampling loop: a LatentDiffusion -> an ADM-format .npz of uint8 samples (EVALUATION.md section 1).

Used by scripts/sample_diffusion.py (full precision) and quant_scripts/04_sample_lora_model.py (a model whose
UNet is a quantized wrapper). Properties the evaluation relies on:
- Deterministic per-image noise: x_T of global image i is drawn from a generator seeded with
  seed * 1_000_003 + i, so FP and quantized runs share initial noise and results do not depend on the batch
  size or the number of processes. eta > 0 per-step noise comes from a generator per shard.
- Work is split into shards of consecutive global indices, each written atomically under `<out>.shards/`
  together with the arguments that made it; a restart with the same arguments skips finished shards (never
  duplicating or dropping a sample) and different arguments are refused.
- Under `torchrun` (RANK / WORLD_SIZE set) shards are spread over the processes; rank 0 merges after a barrier.
- The merged file holds `arr_0` uint8 [N,H,W,3], `arr_1` int64 labels (class-conditional models) and `meta`
  (a JSON string of the settings), in a seeded random order so that IS splits see every class.
"""
import hashlib
import json
import math
import os
import shutil
import tempfile
import zipfile

import numpy as np
import torch

from ldm.util import UserError, atomic_write_bytes

NOISE_SEED_STRIDE = 1_000_003
NOISE_RULE = "x_T[i] = torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1000003 + i))"
DECODE_RULE = "uint8(round(255 * clamp((x + 1) / 2, 0, 1)))"
FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------------- helpers
def conditioning_info(model):
    """(class_conditional, number of real classes, null class id) of a LatentDiffusion."""
    cond = getattr(model, "cond_stage_model", None)
    if cond is None or getattr(model, "cond_stage_key", None) != "class_label":
        if cond is not None and getattr(model, "conditioning_key", None) is not None:
            raise UserError("generate_samples supports class-conditional and unconditional models only, "
                            f"not conditioning on {getattr(model, 'cond_stage_key', None)!r}")
        return False, 0, None
    n = cond.embedding.num_embeddings  # the last embedding row is the null class of classifier-free guidance
    return True, n - 1, n - 1


def balanced_labels(n_samples, classes):
    """Class-major labels: global image i gets classes[i * len(classes) // n_samples] (counts differ by <= 1)."""
    classes = np.asarray(classes, dtype=np.int64)
    return classes[(np.arange(n_samples, dtype=np.int64) * len(classes)) // n_samples]


def initial_noise(seed, indices, shape):
    """x_T for the given global image indices (CPU float32), independent of batching and device."""
    out = torch.empty((len(indices), *shape))
    gen = torch.Generator()
    for row, i in enumerate(indices):
        gen.manual_seed(seed * NOISE_SEED_STRIDE + int(i))
        out[row] = torch.randn(shape, generator=gen)
    return out


def step_noise_seed(seed, shard_index):
    """Seed of the per-shard generator for eta > 0 noise (mixed so it never collides with x_T seeds)."""
    return int(np.random.SeedSequence([seed, shard_index, 1]).generate_state(1, np.uint64)[0] >> 1)


def model_fingerprint(model):
    """Short hash of the state dict's names, shapes, dtypes and absolute sums (device-robust to 6 digits)."""
    h = hashlib.sha256()
    for key, value in model.state_dict().items():
        if not torch.is_tensor(value):  # extra_state of a wrapper module
            h.update(f"{key} {type(value).__name__}\n".encode())
            continue
        total = float(value.detach().double().abs().sum()) if value.numel() else 0.0
        h.update(f"{key} {tuple(value.shape)} {value.dtype} {total:.6e}\n".encode())
    return h.hexdigest()[:16]


def to_uint8_nhwc(x):
    """[-1,1] float [N,C,H,W] -> uint8 NHWC numpy by the toolkit's decode rule."""
    x = torch.clamp((x.detach().float().cpu() + 1.0) / 2.0, 0.0, 1.0)
    return torch.round(x * 255.0).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def read_npz_meta(path):
    with np.load(path, allow_pickle=False) as data:
        return json.loads(str(data["meta"])) if "meta" in data.files else None


def _json_roundtrip(obj):
    return json.loads(json.dumps(obj, sort_keys=True))


def _first_difference(a, b):
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            return f"{key}: {a.get(key)!r} vs {b.get(key)!r}"
    return "none"


# --------------------------------------------------------------------------------------------- distributed
class _Dist:
    """Rank / world size from torchrun's environment; initialises a process group when needed."""

    def __init__(self, device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.owned = False
        if self.world > 1:
            import torch.distributed as dist
            if not dist.is_initialized():
                dist.init_process_group(backend="nccl" if torch.device(device).type == "cuda" else "gloo")
                self.owned = True

    def barrier(self):
        if self.world > 1:
            import torch.distributed as dist
            dist.barrier()

    def close(self):
        if self.owned:
            import torch.distributed as dist
            dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------- shards
class _ShardStore:
    """`<out>.shards/shard_KKKKK.npy` (uint8 images) + `shard_KKKKK.json` (arguments; written last = done)."""

    def __init__(self, out_path, settings, n_samples, shard_size):
        self.dir = out_path + ".shards"
        self.settings = settings
        self.n_shards = math.ceil(n_samples / shard_size)
        self.ranges = [(k * shard_size, min((k + 1) * shard_size, n_samples)) for k in range(self.n_shards)]

    def _paths(self, k):
        stem = os.path.join(self.dir, f"shard_{k:05d}")
        return stem + ".npy", stem + ".json"

    def record(self, k):
        start, stop = self.ranges[k]
        return {"settings": self.settings, "shard": k, "start": start, "stop": stop}

    def done(self, k):
        """True if shard k is complete; a shard made with other arguments is a UserError."""
        npy, js = self._paths(k)
        if not os.path.isfile(js):
            return False
        with open(js) as fh:
            stored = json.load(fh)
        expected = _json_roundtrip(self.record(k))
        if stored != expected:
            diff = _first_difference(stored.get("settings", {}), expected["settings"])
            raise UserError(f"{js} was made with different arguments ({diff}); rerun with the original arguments "
                            f"or delete {self.dir}")
        return os.path.isfile(npy)

    def write(self, k, images):
        npy, js = self._paths(k)
        import io
        buf = io.BytesIO()
        np.save(buf, images, allow_pickle=False)
        atomic_write_bytes(npy, buf.getvalue())
        atomic_write_bytes(js, json.dumps(self.record(k), sort_keys=True).encode())

    def images(self, k):
        return np.load(self._paths(k)[0], mmap_mode="r")


# -------------------------------------------------------------------------------------------------- merging
def _write_npz(path, arrays):
    """Uncompressed .npz written atomically and reproducibly (fixed zip timestamps).

    `arrays`: name -> ndarray, or name -> (shape, dtype, iterable of row blocks) streamed without holding
    the whole array in memory (50k ImageNet samples are ~10 GB).
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".npz")
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, spec in arrays.items():
                info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
                with zf.open(info, "w", force_zip64=True) as fh:
                    if isinstance(spec, np.ndarray):
                        np.lib.format.write_array(fh, spec, allow_pickle=False)
                        continue
                    shape, dtype, blocks = spec
                    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                              "shape": tuple(shape)}
                    np.lib.format.write_array_header_1_0(fh, header)
                    for block in blocks:
                        fh.write(np.ascontiguousarray(block, dtype=dtype).tobytes())
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _grid_png(path, rows):
    """rows: list of lists of uint8 HWC images -> one PNG (rows padded with black)."""
    from PIL import Image

    h, w = rows[0][0].shape[:2]
    ncol = max(len(r) for r in rows)
    canvas = np.zeros((len(rows) * h, ncol * w, 3), np.uint8)
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            canvas[r * h:(r + 1) * h, c * w:(c + 1) * w] = img
    import io
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def grid_path_for(out_path):
    return (out_path[:-4] if out_path.endswith(".npz") else out_path) + "_grid.png"


def _merge(store, out_path, labels, meta, perm_seed):
    n = len(labels)
    shard_of = np.repeat(np.arange(store.n_shards), [b - a for a, b in store.ranges])
    maps = [store.images(k) for k in range(store.n_shards)]
    shape = (n,) + maps[0].shape[1:]
    perm = np.random.default_rng(perm_seed).permutation(n)

    def row(i):
        k = shard_of[i]
        return maps[k][i - store.ranges[k][0]]

    def blocks(chunk=256):
        for s in range(0, n, chunk):
            yield np.stack([row(i) for i in perm[s:s + chunk]])

    # grid first (the .npz is the completion marker): one row per class (up to 10 classes evenly spread,
    # 10 images each), else 8x8 in index order
    if meta["class_conditional"]:
        present = np.unique(labels)
        chosen = present[np.linspace(0, len(present) - 1, min(10, len(present))).round().astype(int)]
        rows = [[row(i) for i in np.flatnonzero(labels == c)[:10]] for c in chosen]
    else:
        rows = [[row(i) for i in range(r, min(r + 8, n))] for r in range(0, min(n, 64), 8)]
    _grid_png(grid_path_for(out_path), rows)

    arrays = {"arr_0": (shape, np.uint8, blocks())}
    if meta["class_conditional"]:
        arrays["arr_1"] = labels[perm].astype(np.int64)
    arrays["meta"] = np.array(json.dumps(meta, sort_keys=True))
    _write_npz(out_path, arrays)


# ------------------------------------------------------------------------------------------------ sampling
def _make_sampler(model, sampler, eta):
    if sampler == "ddim":
        from ldm.models.diffusion.ddim import DDIMSampler
        return DDIMSampler(model)
    if sampler == "plms":
        if eta != 0:
            raise UserError(f"the PLMS sampler is deterministic and needs eta 0, got eta {eta}")
        from ldm.models.diffusion.plms import PLMSSampler
        return PLMSSampler(model)
    raise UserError(f"unknown sampler {sampler!r}; choose ddim or plms")


@torch.no_grad()
def _sample_batch(model, sampler, labels, x_T, settings, null_class, generator):
    device = model.device
    cond = uncond = None
    scale = settings["scale"]
    if labels is not None:
        key = model.cond_stage_key
        cond = model.get_learned_conditioning({key: torch.as_tensor(labels, dtype=torch.long, device=device)})
        if scale != 1.0:
            uncond = model.get_learned_conditioning(
                {key: torch.full((len(labels),), null_class, dtype=torch.long, device=device)})
    samples, _ = sampler.sample(S=settings["ddim_steps"], batch_size=x_T.shape[0], shape=list(x_T.shape[1:]),
                                conditioning=cond, eta=settings["eta"], x_T=x_T.to(device),
                                unconditional_guidance_scale=scale, unconditional_conditioning=uncond,
                                verbose=False, generator=generator, progress=False)
    return to_uint8_nhwc(model.decode_first_stage(samples))


def generate_samples(model, out_path, n_samples, batch_size, ddim_steps=20, eta=0.0, scale=1.0, seed=0,
                     sampler="ddim", classes=None, shard_size=None, meta=None, progress=True, max_shards=None,
                     keep_shards=False):
    """Sample `n_samples` images from a LatentDiffusion into the ADM-format .npz `out_path`.

    classes: class ids to balance over (class-conditional models; None = all real classes, i.e. n_samples /
    n_classes per class). scale: classifier-free guidance scale (1.0 = no guidance; ignored for unconditional
    models). shard_size: images per resumable shard (default 4 batches). meta: extra JSON-able entries for the
    file's meta (e.g. the quantization method). max_shards: stop after this many new shards in this process
    (for tests and time-boxed jobs); the file is then not merged yet. keep_shards: keep `<out>.shards/` after
    merging. Returns `out_path`, or None if shards are still missing.
    """
    out_path = os.fspath(out_path)
    if not out_path.endswith(".npz"):
        raise UserError(f"the output must be a .npz file, got {out_path}")
    if n_samples < 1 or batch_size < 1:
        raise UserError(f"n_samples and batch_size must be positive, got {n_samples} and {batch_size}")
    if seed < 0:
        raise UserError(f"the seed must be non-negative, got {seed}")
    shard_size = int(shard_size or 4 * batch_size)
    class_cond, n_classes, null_class = conditioning_info(model)
    if class_cond:
        classes = list(range(n_classes)) if classes is None else sorted({int(c) for c in classes})
        if not classes or min(classes) < 0 or max(classes) >= n_classes:
            raise UserError(f"classes must be ids in [0, {n_classes}), got {classes}")
        labels = balanced_labels(n_samples, classes)
    else:
        if classes is not None:
            raise UserError("classes were given, but the model is unconditional")
        labels = np.full(n_samples, -1, dtype=np.int64)
        scale = 1.0
    model.eval()
    smp = _make_sampler(model, sampler, eta)
    try:
        smp.make_schedule(ddim_num_steps=ddim_steps, ddim_eta=eta, verbose=False)
    except IndexError:  # uniform spacing overshoots the schedule (e.g. 3 of 1000 steps), as in the original
        raise UserError(f"{ddim_steps} sampling steps do not fit the {model.num_timesteps}-step schedule with "
                        "uniform spacing; choose a divisor of it such as 10, 20, 25, 50, 100, 200, 250") from None
    timesteps = [int(t) for t in np.asarray(smp.ddim_timesteps)]
    shape = [int(model.channels), int(model.image_size), int(model.image_size)]

    settings = {
        "format_version": FORMAT_VERSION, "n_samples": int(n_samples), "batch_size": int(batch_size),
        "shard_size": shard_size, "sampler": sampler, "ddim_steps": int(ddim_steps), "eta": float(eta),
        "scale": float(scale), "seed": int(seed), "timesteps": timesteps, "latent_shape": shape,
        "class_conditional": class_cond, "classes": classes if class_cond else None,
        "null_class": null_class, "model_fingerprint": model_fingerprint(model),
        "noise_rule": NOISE_RULE, "step_noise": "torch.Generator per shard, seeded from (seed, shard index)",
        "decode_rule": DECODE_RULE, "order": "shuffled", "permutation_seed": int(seed),
    }
    extra = _json_roundtrip(meta or {})
    clash = [k for k in extra if k in settings and extra[k] != settings[k]]
    if clash:
        raise ValueError(f"meta entries {clash} contradict the sampling settings")
    settings = _json_roundtrip({**extra, **settings})

    if os.path.isfile(out_path):
        existing = read_npz_meta(out_path)
        if existing == settings:
            return out_path
        raise UserError(f"{out_path} already exists with different settings "
                        f"({_first_difference(existing or {}, settings)}); delete it or choose another output")

    dist = _Dist(model.device)
    try:
        store = _ShardStore(out_path, settings, n_samples, shard_size)
        pending = [k for k in range(store.n_shards) if not store.done(k)]  # every rank validates every shard
        mine = [k for k in pending if k % dist.world == dist.rank]
        if max_shards is not None:
            mine = mine[:max_shards]
        _run_shards(model, smp, store, mine, labels if class_cond else None, settings, null_class,
                    progress and dist.rank == 0)
        dist.barrier()
        merged = None
        if dist.rank == 0 and all(store.done(k) for k in range(store.n_shards)):
            _merge(store, out_path, labels, settings, settings["permutation_seed"])
            if not keep_shards:
                shutil.rmtree(store.dir, ignore_errors=True)
        dist.barrier()
        if os.path.isfile(out_path):
            merged = out_path
        return merged
    finally:
        dist.close()


def _run_shards(model, smp, store, shards, labels, settings, null_class, progress):
    from tqdm import tqdm

    total = sum(store.ranges[k][1] - store.ranges[k][0] for k in shards)
    bar = tqdm(total=total, desc="sampling", unit="img", disable=not progress)
    shape = settings["latent_shape"]
    for k in shards:
        start, stop = store.ranges[k]
        # per-step noise (scaled by 0 when eta = 0) from this shard's generator, never the global RNG
        gen = torch.Generator(device=model.device).manual_seed(step_noise_seed(settings["seed"], k))
        parts = []
        for b in range(start, stop, settings["batch_size"]):
            idx = np.arange(b, min(b + settings["batch_size"], stop))
            x_T = initial_noise(settings["seed"], idx, shape)
            parts.append(_sample_batch(model, smp, None if labels is None else labels[idx], x_T, settings,
                                       null_class, gen))
            bar.update(len(idx))
        store.write(k, np.concatenate(parts))
    bar.close()
