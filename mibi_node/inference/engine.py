"""The inference engine: a bundle loaded once onto a device, studies in, results out.

For a batch of studies the engine runs denoise -> (the bundle's optional super-resolution,
:mod:`mibi_node.imaging.superres`) -> normalise/resize -> every TTA view of every study as
one batch per member -> fusion -> localisation, under ``torch.inference_mode`` with
channels-last tensors and, where the hardware does bf16 natively (CUDA, or CPUs with
AVX512-BF16/AMX), bf16 autocast over weights stored in bf16 (cast once, at load, tensor by
tensor, so no fp32 copy of a member is held; norm layers stay fp32). Members that do not fit
in GPU memory together are kept on the CPU and moved to the GPU one at a time instead of
failing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from mibi_node.errors import UnusableStudyError
from mibi_node.imaging.denoise import adaptive_median, adaptive_median_torch
from mibi_node.imaging.preprocess import Geometry, to_model_input
from mibi_node.imaging.study import StudyInput
from mibi_node.imaging.superres import SuperResolution, load_superres
from mibi_node.imaging.tta import apply_views, average_views, invert_maps
from mibi_node.inference.bundle import Bundle, load_bundle
from mibi_node.inference.ensemble import fuse
from mibi_node.inference.localisation import find_focus
from mibi_node.inference.members import Member, create_member
from mibi_node.inference.result import Focus, StudyResult

__all__ = ["InferenceEngine", "Precision", "cpu_has_native_bf16", "resolve_device"]

logger = logging.getLogger(__name__)

Precision = Literal["auto", "fp32", "bf16"]

# Their parameters and statistics are tiny; in fp32 they keep the running variance exact
# (bf16 has 8 significant bits), and cuDNN and oneDNN take bf16 inputs with fp32 norm weights.
_FP32_MODULES = (
    torch.nn.modules.batchnorm._BatchNorm,
    torch.nn.GroupNorm,
    torch.nn.LayerNorm,
)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> the first CUDA device if there is one, else the CPU; others are checked."""
    if isinstance(device, torch.device):
        resolved = device
    elif not isinstance(device, str):
        raise TypeError(f'Argument "device" should be a string, not {type(device).__name__}.')
    elif device == "auto":
        resolved = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    else:
        try:
            resolved = torch.device(device)
        except RuntimeError:
            raise ValueError(f'Argument "device": {device!r} is not a device name.') from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f'Argument "device": {device!r} asked for CUDA but there is none.')
        index = 0 if resolved.index is None else resolved.index
        if index >= torch.cuda.device_count():
            raise ValueError(f'Argument "device": there is no CUDA device {index}.')
        resolved = torch.device("cuda", index)
    elif resolved.type != "cpu":
        raise ValueError(
            f'Argument "device" should be "auto", "cpu" or "cuda[:N]", got {device!r}.'
        )
    return resolved


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), where autocast pays off.

    ``torch.backends.cpu.get_cpu_capability()`` reports only "AVX512" on such machines, so the
    CPU flags are read directly; on systems without ``/proc/cpuinfo`` the answer is False.
    """
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


class InferenceEngine:
    """A model bundle loaded once onto a device.

    Parameters
    ----------
    bundle
        A loaded :class:`~mibi_node.inference.bundle.Bundle` or the path of its folder.
    device
        ``"auto"`` (first CUDA device, else CPU), ``"cpu"`` or ``"cuda[:N]"``.
    precision
        ``"auto"`` is bf16 on CUDA and on CPUs with native bf16, else fp32. In bf16 the weights
        are stored in bf16 (norm layers in fp32) and the members run under bf16 autocast;
        softmax is always fp32.
    channels_last
        Run the members on channels-last tensors (faster convolutions on CPU and GPU).
    compile
        Wrap every member with ``torch.compile`` (slow first call; worth it for a daemon).
    localise
        Compute the suspected focus (costs little: the attention maps come with the logits).
    max_batch
        Largest number of images (studies x views) one member sees at once.

    Raises
    ------
    BundleError
        The bundle cannot be loaded.
    ValueError
        An argument has a bad value.
    """

    def __init__(
        self,
        bundle: Bundle | Path | str,
        device: str | torch.device = "auto",
        *,
        precision: Precision = "auto",
        channels_last: bool = True,
        compile: bool = False,
        localise: bool = True,
        max_batch: int = 64,
    ) -> None:
        started = time.perf_counter()
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        self.device = resolve_device(device)
        if precision not in ("auto", "fp32", "bf16"):
            raise ValueError(
                f'Argument "precision" should be auto, fp32 or bf16, got {precision!r}.'
            )
        if precision == "auto":
            native = (
                torch.cuda.is_bf16_supported()
                if self.device.type == "cuda"
                else cpu_has_native_bf16()
            )
            precision = "bf16" if native else "fp32"
        self.precision: Literal["fp32", "bf16"] = precision
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(
                f'Argument "max_batch" should be a positive integer, got {max_batch!r}.'
            )
        self.max_batch = max_batch
        self.channels_last = channels_last
        self.localise = localise
        self.views = self.bundle.views
        self.fusion = self.bundle.fusion
        self.members: dict[str, Member] = {}
        self._streamed: set[str] = set()
        for name in self.bundle.member_names:
            self.members[name] = self._place(name)
        self.superres: SuperResolution | None = None
        if self.bundle.superres_path is not None:
            self.superres = load_superres(self.bundle.superres_path, self.device)
        self._forward = {
            name: (torch.compile(m.forward_with_attention) if compile else m.forward_with_attention)
            for name, m in self.members.items()
        }
        self.load_seconds = time.perf_counter() - started
        logger.info(
            "engine: bundle %s %s on %s, %s, %d members (%d streamed), loaded in %.2f s",
            self.bundle.name,
            self.bundle.version,
            self.device,
            self.precision,
            len(self.members),
            len(self._streamed),
            self.load_seconds,
        )

    def _place(self, name: str) -> Member:
        memory_format = torch.channels_last if self.channels_last else torch.preserve_format
        if self.device.type == "cuda" and not self._streamed:
            try:
                member = self._build(name, self.device)
                return member.to(memory_format=memory_format)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                logger.warning("member %s does not fit on %s: streaming it", name, self.device)
        member = self._build(name, torch.device("cpu")).to(memory_format=memory_format)
        if self.device.type == "cuda":
            self._streamed.add(name)
        return member

    def _build(self, name: str, device: torch.device) -> Member:
        if self.precision == "fp32":
            return self.bundle.build_member(name, device)
        return _build_bf16(self.bundle, name, device)

    # -- the pipeline ---------------------------------------------------------------------

    def predict(self, studies: Sequence[StudyInput]) -> list[StudyResult]:
        """Classify a batch of studies.

        Parameters
        ----------
        studies
            Studies holding at least the bundle's input channels.

        Returns
        -------
        list of StudyResult
            One result per study, in order.

        Raises
        ------
        TypeError
            ``studies`` is not a sequence of ``StudyInput``.
        UnusableStudyError
            A study lacks a phase the bundle needs; the message names the study and phase.
        """
        if isinstance(studies, StudyInput) or not isinstance(studies, Sequence):
            raise TypeError('Argument "studies" should be a sequence of StudyInput.')
        if not studies:
            return []
        for study in studies:
            if not isinstance(study, StudyInput):
                raise TypeError(
                    'Argument "studies" should hold StudyInput objects, '
                    f"not {type(study).__name__}."
                )
            missing = [c for c in self.bundle.channels if c not in study.images]
            if missing:
                raise UnusableStudyError(
                    f"study {study.study_instance_uid} has no {' or '.join(missing)} image, which "
                    f"bundle {self.bundle.name} needs"
                )

        per_study: list[dict[str, float]] = []
        inputs: list[np.ndarray] = []
        geometries: list[list[Geometry]] = []
        for study in studies:
            timings: dict[str, float] = {}
            started = time.perf_counter()
            images = [self._denoise(study.images[c].pixels) for c in self.bundle.channels]
            timings["denoise"] = time.perf_counter() - started
            if self.superres is not None:
                started = time.perf_counter()
                shapes = [image.shape for image in images]
                images = [self.superres.upsample(image) for image in images]
                timings["superres"] = time.perf_counter() - started
            started = time.perf_counter()
            array, geometry = to_model_input(
                images, self.bundle.input_size, self.bundle.normalisation
            )
            if self.superres is not None:
                geometry = [_source_geometry(g, s) for g, s in zip(geometry, shapes, strict=True)]
            timings["preprocess"] = time.perf_counter() - started
            inputs.append(array)
            geometries.append(geometry)
            per_study.append(timings)

        batch_timings: dict[str, float] = {}
        with torch.inference_mode():
            started = time.perf_counter()
            batch = torch.from_numpy(np.stack(inputs)).to(self.device)
            views = apply_views(batch, self.views)
            if self.channels_last:
                views = views.contiguous(memory_format=torch.channels_last)
            batch_timings["tta"] = time.perf_counter() - started

            started = time.perf_counter()
            member_probs, member_maps = [], []
            for name in self.members:
                probs, maps = self._run_member(name, views)
                member_probs.append(average_views(probs, len(self.views)).cpu().numpy())
                member_maps.append(maps)
            batch_timings["members"] = time.perf_counter() - started

            started = time.perf_counter()
            fused = fuse(np.stack(member_probs), self.fusion)
            batch_timings["fusion"] = time.perf_counter() - started

            started = time.perf_counter()
            attention = self._attention(member_maps, len(studies)) if self.localise else None
            batch_timings["localisation"] = time.perf_counter() - started

        keys = self.bundle.class_keys
        focus_phase = "delayed" if "delayed" in self.bundle.channels else self.bundle.channels[-1]
        focus_index = self.bundle.channels.index(focus_phase)
        anatomy_phase = next(
            (p for p in ("thyroid", "early") if p in self.bundle.channels), focus_phase
        )
        anatomy_index = self.bundle.channels.index(anatomy_phase)
        results = []
        for i, study in enumerate(studies):
            predicted = keys[int(fused.predicted[i])]
            focus: Focus | None = None
            started = time.perf_counter()
            if attention is not None and predicted != "normal":
                focus = find_focus(
                    attention[i],
                    inputs[i][focus_index],
                    inputs[i][anatomy_index],
                    geometries[i][focus_index],
                    phase=focus_phase,
                )
            timings = per_study[i]
            for stage, seconds in batch_timings.items():
                timings[stage] = seconds / len(studies)
            timings["localisation"] += time.perf_counter() - started
            warnings = list(study.warnings)
            if self.bundle.intended_use == "demonstration":
                warnings.append(
                    f"bundle {self.bundle.name} {self.bundle.version} is for demonstration only, "
                    "not for diagnosis"
                )
            results.append(
                StudyResult(
                    study_instance_uid=study.study_instance_uid,
                    probabilities={
                        k: float(p) for k, p in zip(keys, fused.probabilities[i], strict=True)
                    },
                    predicted=predicted,
                    member_probabilities={
                        name: {
                            k: float(p)
                            for k, p in zip(keys, fused.member_probabilities[m, i], strict=True)
                        }
                        for m, name in enumerate(self.members)
                    },
                    agreement=float(fused.agreement[i]),
                    normalised_entropy=float(fused.normalised_entropy[i]),
                    focus=focus,
                    source_images={c: study.images[c] for c in self.bundle.channels},
                    timings=timings,
                    warnings=tuple(warnings),
                    bundle_name=self.bundle.name,
                    bundle_version=self.bundle.version,
                    intended_use=self.bundle.intended_use,
                )
            )
        return results

    def predict_one(self, study: StudyInput) -> StudyResult:
        """Classify one study (see :meth:`predict`)."""
        return self.predict([study])[0]

    def _denoise(self, pixels: np.ndarray) -> np.ndarray:
        smax = self.bundle.denoise_smax
        if smax is None:
            return pixels
        if self.device.type == "cuda":
            tensor = torch.from_numpy(np.ascontiguousarray(pixels)).to(self.device)
            return adaptive_median_torch(tensor, smax=smax).cpu().numpy()
        return adaptive_median(pixels, smax=smax)

    def _run_member(self, name: str, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Probabilities (N, K) and attention maps (N, h, w) of one member over all views."""
        member = self.members[name]
        streamed = name in self._streamed
        if streamed:
            member.to(self.device)
        try:
            probs, maps = [], []
            with torch.autocast(
                device_type=self.device.type,
                dtype=torch.bfloat16,
                enabled=self.precision == "bf16",
            ):
                for chunk in views.split(self.max_batch):
                    logits, attention = self._forward[name](chunk)
                    probs.append(logits.float().softmax(dim=-1))
                    maps.append(attention.float())
            return torch.cat(probs), torch.cat(maps)
        finally:
            if streamed:
                member.to("cpu")
                torch.cuda.empty_cache()

    def _attention(self, member_maps: list[torch.Tensor], n_studies: int) -> np.ndarray:
        """Member- and view-averaged attention in the model-input frame, (B, S, S)."""
        size = self.bundle.input_size
        total: torch.Tensor | None = None
        for weight, maps in zip(self.fusion.weights, member_maps, strict=True):
            upsampled = F.interpolate(
                maps[:, None], size=(size, size), mode="bilinear", align_corners=False
            )[:, 0]
            warped = invert_maps(upsampled, self.views)  # (B, V, S, S)
            coverage = invert_maps(torch.ones_like(upsampled), self.views)
            averaged = warped.sum(dim=1) / coverage.sum(dim=1).clamp_min(1e-6)
            total = averaged * weight if total is None else total + averaged * weight
        assert total is not None
        return total.reshape(n_studies, size, size).cpu().numpy()


def _source_geometry(geometry: Geometry, shape: tuple[int, ...]) -> Geometry:
    """The geometry of a super-resolved phase, mapped back onto its source image.

    The padding of the upsampled image is the source's times the scale, so dividing it gives
    the same model-input-to-source mapping as without super-resolution.
    """
    scale = geometry.source_shape[0] // shape[0]
    return Geometry(
        source_shape=(int(shape[0]), int(shape[1])),
        size=geometry.size,
        pad=(geometry.pad[0] // scale, geometry.pad[1] // scale),
    )


def _fp32_keys(member: torch.nn.Module) -> set[str]:
    """State-dict keys of the norm layers, which stay fp32 in a bf16 member."""
    return {
        f"{prefix}.{key}" if prefix else key
        for prefix, module in member.named_modules()
        if isinstance(module, _FP32_MODULES)
        for key in module.state_dict(keep_vars=True)
    }


def _build_bf16(bundle: Bundle, name: str, device: torch.device) -> Member:
    """Member ``name`` with bf16 weights (norm layers fp32), read tensor by tensor.

    The member is built on the meta device and each tensor is cast as it is read, so at most
    one fp32 tensor exists at a time instead of a whole fp32 member (or, with autocast over
    fp32 weights, fp32 weights and their bf16 copies side by side).
    """
    from safetensors import safe_open

    config = bundle.member_config(name)
    entry = next(e for e in bundle.manifest.members if e.name == name)

    def create() -> Member:
        return create_member(
            config.arch,
            num_classes=config.num_classes,
            in_chans=config.in_chans,
            heads=config.heads,
            embed_dim=config.embed_dim,
            input_size=config.input_size,
        )

    with torch.device("meta"):
        member = create()
    keep = _fp32_keys(member)
    state: dict[str, torch.Tensor] = {}
    path = bundle.directory / entry.weights
    with safe_open(str(path), framework="pt", device=str(device)) as handle:  # type: ignore[no-untyped-call]
        for key in handle.keys():  # noqa: SIM118
            tensor = handle.get_tensor(key)
            # get_tensor may return a view of the file's private mapping: a tensor kept as
            # it is would keep the whole mapping (the member in fp32) resident
            if tensor.is_floating_point() and key not in keep:
                state[key] = tensor.to(torch.bfloat16)
            else:
                state[key] = tensor.clone()
            del tensor
    member.load_state_dict(state, strict=True, assign=True)
    if any(t.is_meta for t in (*member.parameters(), *member.buffers())):
        # a non-persistent buffer is not in the file: build for real, then copy in
        member = create().to(device, torch.bfloat16)
        for module in member.modules():
            if isinstance(module, _FP32_MODULES):
                module.float()
        member.load_state_dict(state, strict=True)
    return member.eval()
