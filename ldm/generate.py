"""The one sampling loop: a model of any family -> an ADM-format .npz of uint8 samples (EVALUATION.md section 1).

Used by scripts/sample_diffusion.py and scripts/txt2img.py (full precision) and quant_scripts/04_sample_lora_model.py
(a model whose UNet is a quantized wrapper or an engine). The family questions (conditioning, sampler, schedule,
decode) are answered by ldm.pipelines: class-conditional and unconditional LDMs, text LDMs (one prompt per image)
and the pixel-space DDIM model. Properties the evaluation relies on:
- Deterministic per-image noise for every family: x_T of global image i is drawn on the CPU from a generator seeded
  with seed * 1_000_003 + i, so FP and quantized runs share initial noise and results do not depend on the batch
  size or the number of processes. Per-step noise (eta > 0) comes from a generator per shard.
- Work is split into shards of consecutive global indices, each written atomically under `<out>.shards/`
  together with the arguments that made it; a restart with the same arguments skips finished shards (never
  duplicating or dropping a sample) and different arguments are refused.
- Under `torchrun` (RANK / WORLD_SIZE set) shards are spread over the processes; rank 0 merges after a barrier.
- The merged file holds `arr_0` uint8 [N,H,W,3], `arr_1` int64 labels (class-conditional models; for text models the
  digit each prompt names when every prompt is a digits phrasing), `prompts` (text models: the prompt of each image)
  and `meta` (a JSON string of the settings). Class-conditional and unconditional samples are stored in a seeded
  random order (IS splits of 5,000 must see every class); text samples in index order (image i has prompt i).
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

from ldm.util import TMP_PREFIX, UserError, _publish, atomic_write_bytes, remove_stale_tmp_files

NOISE_SEED_STRIDE = 1_000_003
NOISE_RULE = "x_T[i] = torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1000003 + i))"
DECODE_RULE = "uint8(round(255 * clamp((x + 1) / 2, 0, 1)))"
FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------------- helpers
def conditioning_info(model):
    """(class_conditional, number of real classes, null class id) of a model (text and pixel models: not
    class-conditional)."""
    from ldm.pipelines import adapter_for

    fam = adapter_for(model)
    return fam.conditioning == "class", fam.n_classes, fam.null_class


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


def uniform_schedule(steps, num_timesteps, flag="--ddim_steps"):
    """The DDIM timesteps of ``steps`` uniform steps over a ``num_timesteps`` schedule, or a UserError naming
    ``flag`` when they do not fit (more steps than the schedule, or a last step at t = num_timesteps, which the
    original uniform spacing produces for e.g. 3 or 1000 of 1000 steps)."""
    from ldm.modules.diffusionmodules.util import make_ddim_timesteps

    fitting = [d for d in range(2, num_timesteps) if num_timesteps % d == 0]
    near = sorted(fitting, key=lambda d: (abs(d - steps), d))[:6]
    advice = f"choose a divisor of {num_timesteps} such as {', '.join(str(d) for d in sorted(near))}"
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps < num_timesteps:
        raise UserError(f"{flag} {steps} does not fit the {num_timesteps}-step schedule; {advice}")
    timesteps = [int(t) for t in make_ddim_timesteps("uniform", steps, num_timesteps, verbose=False)]
    if timesteps[-1] >= num_timesteps:
        raise UserError(f"{flag} {steps} does not fit the {num_timesteps}-step schedule with uniform spacing (its "
                        f"last step would be t={timesteps[-1]}); {advice}")
    return timesteps


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
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=TMP_PREFIX, suffix=".npz")
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
        _publish(tmp, path)  # umask permissions like its grid (mkstemp makes 0600), then rename
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def grid_png(path, rows):
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


def _merge(store, out_path, labels, meta, perm_seed, prompts=None):
    n = len(labels)
    shard_of = np.repeat(np.arange(store.n_shards), [b - a for a, b in store.ranges])
    maps = [store.images(k) for k in range(store.n_shards)]
    shape = (n,) + maps[0].shape[1:]
    perm = np.arange(n) if meta["order"] == "index" else np.random.default_rng(perm_seed).permutation(n)

    def row(i):
        k = shard_of[i]
        return maps[k][i - store.ranges[k][0]]

    def blocks(chunk=256):
        for s in range(0, n, chunk):
            yield np.stack([row(i) for i in perm[s:s + chunk]])

    # grid first (the .npz is the completion marker): one row per class (up to 10 classes evenly spread,
    # 10 images each) or per prompt (the first 10 distinct prompts), else 8x8 in index order
    if meta["class_conditional"]:
        present = np.unique(labels)
        chosen = present[np.linspace(0, len(present) - 1, min(10, len(present))).round().astype(int)]
        rows = [[row(i) for i in np.flatnonzero(labels == c)[:10]] for c in chosen]
    elif prompts is not None:
        first = list(dict.fromkeys(prompts))[:10]
        rows = [[row(i) for i in np.flatnonzero(np.asarray(prompts, dtype=object) == p)[:10]] for p in first]
    else:
        rows = [[row(i) for i in range(r, min(r + 8, n))] for r in range(0, min(n, 64), 8)]
    grid_png(grid_path_for(out_path), rows)

    arrays = {"arr_0": (shape, np.uint8, blocks())}
    if meta["class_conditional"] or (prompts is not None and (labels >= 0).all()):
        arrays["arr_1"] = labels[perm].astype(np.int64)
    if prompts is not None:
        arrays["prompts"] = np.array([prompts[i] for i in perm], dtype=str)
    arrays["meta"] = np.array(json.dumps(meta, sort_keys=True))
    _write_npz(out_path, arrays)


def export_images(npz_path, png_dir, prompts_path=None):
    """The merged samples as PNGs (png_dir/NNNNN.png, image i of arr_0) and, for text samples, one prompt per line
    (line i = prompt of image i, whitespace collapsed); existing PNGs are kept (the samples are deterministic)."""
    import io

    from PIL import Image

    os.makedirs(png_dir, exist_ok=True)
    with np.load(npz_path, allow_pickle=False) as data:
        images = data["arr_0"]
        for i in range(images.shape[0]):
            path = os.path.join(png_dir, f"{i:05d}.png")
            if not os.path.isfile(path):
                buf = io.BytesIO()
                Image.fromarray(images[i]).save(buf, format="PNG")
                atomic_write_bytes(path, buf.getvalue())
        if prompts_path is not None and "prompts" in data.files:
            text = "".join(" ".join(str(p).split()) + "\n" for p in data["prompts"])
            atomic_write_bytes(prompts_path, text.encode("utf-8"))
    return png_dir


# ------------------------------------------------------------------------------------------------ sampling
TEXT_ORDER_RULE = "image i has prompt i (index order, not shuffled)"
TEXT_TRUNCATION_RULE = "the model's tokenizer truncates to its max_length (77) tokens, start and end tokens kept"


def _text_settings(fam, prompts):
    """Settings entries of a prompt list: its hash, the images whose prompt the tokenizer truncates, labels rule."""
    from ldm.data.prompts import digit_of_prompt

    embedder = fam.model.cond_stage_model
    distinct_prompts = list(dict.fromkeys(prompts))
    ids = embedder.tokenizer(distinct_prompts, truncation=False, add_special_tokens=True, verbose=False)["input_ids"]
    too_long = {p for p, row in zip(distinct_prompts, ids) if len(row) > embedder.max_length}
    digits = [digit_of_prompt(p) for p in prompts]
    labels = np.asarray([-1 if d is None else d for d in digits], dtype=np.int64)
    entries = {"conditioning": "text", "unconditional_prompt": "", "order": "index", "order_rule": TEXT_ORDER_RULE,
               "prompts_sha256": hashlib.sha256(json.dumps(list(prompts)).encode("utf-8")).hexdigest(),
               "n_distinct_prompts": len(distinct_prompts), "truncation": TEXT_TRUNCATION_RULE,
               "truncated_images": [i for i, p in enumerate(prompts) if p in too_long],
               "labels": ("arr_1: the digit each prompt names (ldm.data.prompts.digit_of_prompt)"
                          if (labels >= 0).all() else None)}
    return entries, labels


def generate_samples(model, out_path, n_samples=None, batch_size=50, ddim_steps=20, eta=0.0, scale=1.0, seed=0,
                     sampler="ddim", classes=None, shard_size=None, meta=None, progress=True, max_shards=None,
                     keep_shards=False, prompts=None, skip_type=None):
    """Sample `n_samples` images from a model of any family (ldm.pipelines) into the ADM-format .npz `out_path`.

    classes: class ids to balance over (class-conditional models; None = all real classes, i.e. n_samples /
    n_classes per class). prompts: text models, the prompt of each image (n_samples defaults to its length).
    scale: classifier-free guidance scale (1.0 = no guidance; ignored for unconditional models). skip_type: timestep
    spacing of the pixel family ("quad" or "uniform"; LDMs space uniformly). shard_size: images per resumable shard
    (default 4 batches). meta: extra JSON-able entries for the file's meta (e.g. the quantization method).
    max_shards: at most this many new shards in this process (for tests and time-boxed jobs; a positive number);
    the file is then not merged yet. keep_shards: keep `<out>.shards/` after merging. Returns `out_path`, or None if
    shards are still missing.
    """
    out_path = os.fspath(out_path)
    if not out_path.endswith(".npz"):
        raise UserError(f"the output must be a .npz file, got {out_path}")
    if n_samples is None and prompts is not None:
        n_samples = len(prompts)
    if n_samples is None or n_samples < 1 or batch_size < 1:
        raise UserError(f"n_samples and batch_size must be positive, got {n_samples} and {batch_size}")
    if seed < 0:
        raise UserError(f"the seed must be non-negative, got {seed}")
    if max_shards is not None and max_shards < 1:
        raise UserError(f"max_shards must be a positive number of new shards, got {max_shards}")
    if shard_size is not None and shard_size < 1:
        raise UserError(f"shard_size must be positive, got {shard_size}")
    shard_size = int(shard_size or 4 * batch_size)
    from ldm.pipelines import adapter_for

    fam = adapter_for(model)
    class_cond, n_classes, null_class = fam.conditioning == "class", fam.n_classes, fam.null_class
    text = fam.conditioning == "text"
    if text:
        if prompts is None or len(prompts) != n_samples:
            raise UserError(f"a text model needs one prompt per image: {n_samples} images but "
                            f"{'no' if prompts is None else len(prompts)} prompts")
        if classes is not None:
            raise UserError("classes were given, but the model is conditioned on text; give prompts")
        prompts = [str(p) for p in prompts]
    elif prompts is not None:
        raise UserError(f"prompts were given, but the model is not conditioned on text ({fam.conditioning})")
    if class_cond:
        classes = list(range(n_classes)) if classes is None else sorted({int(c) for c in classes})
        if not classes or min(classes) < 0 or max(classes) >= n_classes:
            raise UserError(f"classes must be ids in [0, {n_classes}), got {classes}")
        labels = balanced_labels(n_samples, classes)
    else:
        if classes is not None and not text:
            raise UserError("classes were given, but the model is unconditional")
        labels = np.full(n_samples, -1, dtype=np.int64)
        if fam.conditioning == "none":
            scale = 1.0
    model.eval()
    if fam.family == "pixel":
        skip_type = skip_type or "quad"
    fam.check_sampler(sampler, eta, skip_type)
    fam.schedule(ddim_steps, skip_type, "ddim_steps")  # a UserError before any work
    timesteps = fam.sampling_timesteps(ddim_steps, sampler, skip_type)

    settings = {
        "format_version": FORMAT_VERSION, "n_samples": int(n_samples), "batch_size": int(batch_size),
        "shard_size": shard_size, "sampler": sampler, "ddim_steps": int(ddim_steps), "eta": float(eta),
        "scale": float(scale), "seed": int(seed), "timesteps": timesteps, "latent_shape": fam.latent_shape,
        "class_conditional": class_cond, "classes": classes if class_cond else None,
        "null_class": null_class, "model_fingerprint": model_fingerprint(model),
        "noise_rule": NOISE_RULE, "step_noise": "torch.Generator per shard, seeded from (seed, shard index)",
        "decode_rule": DECODE_RULE, "order": "shuffled", "permutation_seed": int(seed),
    }
    if fam.family != "ldm":  # new keys only for the new families: LDM sample files keep their settings
        settings.update(family=fam.family, skip_type=skip_type)
    if text:
        entries, labels = _text_settings(fam, prompts)
        settings.update(entries)
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
        if dist.rank == 0:  # leftovers of a killed run (older than this process) in the output and shard dirs
            remove_stale_tmp_files(os.path.dirname(os.path.abspath(out_path)))
            remove_stale_tmp_files(store.dir)
        pending = [k for k in range(store.n_shards) if not store.done(k)]  # every rank validates every shard
        mine = [k for k in pending if k % dist.world == dist.rank]
        if max_shards is not None:
            mine = mine[:max_shards]
        items = labels if class_cond else (prompts if text else None)
        _run_shards(fam, store, mine, items, settings, progress and dist.rank == 0)
        dist.barrier()
        merged = None
        if dist.rank == 0 and all(store.done(k) for k in range(store.n_shards)):
            _merge(store, out_path, labels, settings, settings["permutation_seed"], prompts if text else None)
            if not keep_shards:
                shutil.rmtree(store.dir, ignore_errors=True)
        dist.barrier()
        if os.path.isfile(out_path):
            merged = out_path
        return merged
    finally:
        dist.close()


@torch.no_grad()
def _sample_batch(fam, items, x_T, settings, generator):
    """uint8 NHWC images of one batch: conditioning of its items, the family's sampler, decode."""
    scale = settings["scale"]
    cond = fam.cond(items) if items is not None else None
    uncond = fam.uncond(x_T.shape[0]) if items is not None and scale != 1.0 else None
    z = fam.sample(x_T, cond, uncond, scale, settings["ddim_steps"], settings["eta"], settings["sampler"],
                   settings.get("skip_type"), generator)
    return to_uint8_nhwc(fam.decode(z))


def _run_shards(fam, store, shards, items, settings, progress):
    from tqdm import tqdm

    model = fam.model
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
            batch_items = None if items is None else [items[i] for i in idx]
            parts.append(_sample_batch(fam, batch_items, x_T, settings, gen))
            bar.update(len(idx))
        store.write(k, np.concatenate(parts))
    bar.close()
