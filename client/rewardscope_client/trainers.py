"""Reward functions in the call shapes of more trainers: AlignProp (reward back-propagation), verl / verl-omni
(an async per-sample `compute_score`), DanceGRPO (one image at a time), and factories a trainer's config string
can name: ddpo-pytorch's `getattr(ddpo_pytorch.rewards, config.reward_fn)()` and an entry of flow_grpo's
`multi_score(device, score_dict)`.

Each applies `on_failure` (rewardscope_client.failures): "raise" (default) names the failed item in an error,
"impute" gives it the mean of the valid items scored with it (its prompt's first) and marks it `imputed`, "nan"
leaves NaN for loops that mask. Never a silent NaN, never 0.

Per-sample trainers (verl, DanceGRPO) call the reward once per image, often concurrently; `ScoreCoalescer` gathers
the calls that arrive within `max_wait_s` (at most `max_batch`) into one POST /score and hands each caller its own
item's result.

What each adapter was written against (read with the code-search tools; their code is not copied here):
- TRL, trl/trainer/alignprop_trainer.py (trl < 0.24): AlignPropTrainer.compute_rewards unpacks
  `reward, reward_metadata = self.reward_fn(images, prompts, prompt_metadata)`; calculate_loss is
  `10.0 - rewards.mean()`; step() back-propagates it through the images that `_generate_samples` made with
  `rgb_with_grad(..., output_type="pt")` (pixels in [0, 1]).
- mihirp1998/AlignProp, alignprop_trainer.py: `hps_loss_fn` / `aesthetic_loss_fn` return
  `loss_fn(im_pix, prompts) -> (loss, rewards)` on pixels in [-1, 1] (`(im_pix / 2 + 0.5).clamp(0, 1)`).
- verl-project/verl-omni, verl_omni/reward_loop/reward_manager/visual.py: VisualRewardManager.run_single awaits
  `self.compute_score(data_source=..., solution_image=response_visual, ground_truth=..., extra_info=...,
  **extra_reward_kwargs)` when `inspect.iscoroutinefunction(self.compute_score)` (else it runs it in an executor);
  the extra kwargs are reward_router_address, reward_model_tokenizer, model_name and sampling_params when a reward
  router is configured; the result is a float or a dict whose "score" is the reward and whose other keys go to
  reward_extra_info; pixel responses are uint8 tensors. verl-project/verl,
  tests/experimental/reward_loop/reward_fn.py: `compute_score_ocr(data_source, solution_image, ground_truth,
  extra_info, reward_router_address, ...)`, the image variant. volcengine/verl, verl/utils/reward_score/__init__.py:
  `default_compute_score(data_source, solution_str, ground_truth, extra_info=None, ...)`, the text variant,
  returning a float or a dict.
- XueZeyue/DanceGRPO, fastvideo/train_grpo_flux.py: sample_reference_model samples one image at a time
  (batch_size = 1), decodes it to `decoded_image` (a list of one PIL image) and appends a reward of shape [1]
  (`hps_score = torch.diagonal(logits_per_image)`, or PickScore's `calc_probs(...)`) to `all_rewards`;
  train_one_step then uses `torch.cat(all_rewards, dim=0).to(torch.float32)` for per-group advantages.
- kvablack/ddpo-pytorch, scripts/train.py: `reward_fn = getattr(ddpo_pytorch.rewards, config.reward_fn)()`, called as
  `executor.submit(reward_fn, images, prompts, prompt_metadata)`, its result unpacked `rewards, reward_metadata`;
  ddpo_pytorch/rewards.py: every entry is a zero-argument factory returning `_fn(images, prompts, metadata)`.
- yifan123/flow_grpo, flow_grpo/rewards.py: multi_score(device, score_dict) builds each named scorer with
  `score_functions[name](device) if 'device' in score_functions[name].__code__.co_varnames else
  score_functions[name]()`, calls it `scores, rewards = fn(images, prompts, metadata)` and weights
  `[weight * score for score in scores]`.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np

from .adapters import DDPORewardFunction, _select, _then, batch_info, ddpo_reward_fn
from .client import RewardClient
from .failures import FailurePolicy, ItemsFailed
from .images import InvalidImage, is_torch_tensor, split_images
from .protocol import RewardSpec

if TYPE_CHECKING:  # Python 3.11 has it in typing
    from typing_extensions import Unpack
from .results import ScoreBatch

# Environment variables the config-string factories read. REWARDSCOPE_REWARDS and REWARDSCOPE_PROFILE configure the
# service itself, so the client's choices have their own names.
ENV_URL = "REWARDSCOPE_URL"
ENV_TOKEN = "REWARDSCOPE_TOKEN"
ENV_REWARDS = "REWARDSCOPE_CLIENT_REWARDS"  # "matching,clip" or a JSON object {"matching": 1.0, "clip": 0.5}
ENV_PROFILE = "REWARDSCOPE_CLIENT_PROFILE"
ENV_ON_FAILURE = "REWARDSCOPE_CLIENT_ON_FAILURE"  # raise | impute | nan
ENV_SELECT = "REWARDSCOPE_CLIENT_SELECT"  # "total" or one reward's name

# What a per-sample caller gets back (verl's dict; DanceGRPO's `details`). The keys are the same for every sample:
# verl gathers each non-"score" key across the batch into reward_extra_info.
SAMPLE_KEYS = ("score", "error", "error_code", "imputed", "valid")


class SampleFailed(ItemsFailed):
    """A per-sample call whose item the service could not score (and that on_failure did not fill). `indices` is
    the item's position in its coalesced batch; `prompt` its prompt."""

    def __init__(self, batch: ScoreBatch, index: int, prompt: str, on_failure: str) -> None:
        super().__init__([index], batch, len(batch))
        self.prompt = prompt
        code, error = batch.error_codes[index], batch.errors[index]
        reason = f"sample with prompt {prompt!r} could not be scored: {code or 'error'}: {error}"
        if on_failure == "impute":
            advice = (
                f"on_failure='impute' had nothing to impute from: none of the {len(batch)} samples batched with it "
                "scored, nor any before them. Pass on_failure='nan' and mask it "
                "(rewardscope_client.failures.nan_aware_advantages)"
            )
        else:
            advice = (
                "Pass on_failure='impute' to give it the mean reward of its prompt's valid samples batched with it, "
                "else the recent valid mean, or on_failure='nan' to mask it yourself"
            )
        self.args = (f"{reason}. {advice}",)


@dataclass
class _Sample:
    entry: Any  # the image, checked and copied when the call arrived
    prompt: str
    metadata: Mapping[str, Any] | None
    future: Future[dict[str, Any]]


# Stands in for an image with NaN or infinite pixels: re-checked when the batch is sent, it becomes the same local
# failure ("invalid_pixels") as the original would have, so the sample fails alone and its batch is scored.
_NON_FINITE = np.full((1, 1, 3), np.nan, dtype=np.float32)


def _one_image(image: Any) -> Any:
    """One image -> what the batch will send: pixels converted to uint8 and copied now (the caller may reuse its
    buffer at once), PIL images / paths / bytes as they are. A batch of several images is refused."""
    entries = split_images([image], copy=True)
    if len(entries) != 1:
        raise ValueError(f"a per-sample reward call takes one image; got a batch of {len(entries)}")
    return _NON_FINITE if isinstance(entries[0], InvalidImage) else entries[0]


def _settle(future: Future[Any], result: Any) -> None:
    """Resolve a caller's future with a value or an exception, unless the caller gave up (cancelled) first."""
    if future.done():
        return
    try:
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)
    except Exception:  # cancelled between the check and the set: nobody is waiting
        pass


class ScoreCoalescer:
    """Per-sample reward calls -> batched POST /score requests.

    `submit(image, prompt)` (any thread) returns a Future; `await ascore(image, prompt)` (any event loop) the same
    result. Calls arriving within `max_wait_s` of the first pending one, at most `max_batch`, go out as one
    `client.score_async` call (the client still splits a batch larger than its chunk_size into chunks); each caller
    gets its own item's result: {"score", "error", "error_code", "imputed", "valid"}.

    Failed items follow `on_failure` over the coalesced batch: "raise" -> that caller alone gets SampleFailed (an
    ItemsFailed), the others their scores; "impute" -> the mean of the batch's valid items with the same prompt,
    else the recent valid mean (this batch and earlier ones: FailurePolicy's history; SampleFailed when nothing valid
    was ever scored); "nan" -> score NaN, valid False. A request that
    fails as a whole (RewardServiceError) reaches every caller of the batch.

    `stats` counts samples, requests (batches sent), failed and imputed samples. Takes a RewardClient (thread-safe,
    usable from any event loop), not an AsyncRewardClient.
    """

    def __init__(
        self,
        client: RewardClient,
        rewards: str | RewardSpec | None = None,
        profile: str | None = None,
        on_failure: str = "raise",
        max_batch: int = 32,
        max_wait_s: float = 0.01,
        select: str = "total",
    ) -> None:
        if not isinstance(client, RewardClient):
            raise TypeError(
                f"ScoreCoalescer needs a RewardClient (it batches calls from any thread or event loop); got "
                f"{type(client).__name__}"
            )
        if max_batch < 1 or max_wait_s < 0:
            raise ValueError(f"max_batch must be >= 1 and max_wait_s >= 0; got {max_batch} and {max_wait_s}")
        self.client, self.rewards, self.profile, self.select = client, rewards, profile, select
        self.policy = FailurePolicy(on_failure)
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self.stats = {"samples": 0, "requests": 0, "failed": 0, "imputed": 0}
        self._lock = threading.Lock()
        self._pending: list[_Sample] = []
        self._generation = 0  # bumped whenever the pending batch is taken: a stale timer then does nothing

    def submit(self, image: Any, prompt: str, metadata: Mapping[str, Any] | None = None) -> Future[dict[str, Any]]:
        """Queue one sample; the Future resolves to its result dict (or raises SampleFailed / the request's
        error). image: a PIL image, an array or tensor [C, H, W] / [H, W, C] (uint8, or float in [0, 1]), a path or
        encoded bytes."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string; got {type(prompt).__name__}")
        sample = _Sample(_one_image(image), prompt, metadata, Future())
        full = None
        with self._lock:
            self.stats["samples"] += 1
            self._pending.append(sample)
            if len(self._pending) >= self.max_batch:
                full = self._take()
            elif len(self._pending) == 1:
                timer = threading.Timer(self.max_wait_s, self._flush_generation, (self._generation,))
                timer.daemon = True
                timer.start()
        if full:
            self._send(full)
        return sample.future

    async def ascore(self, image: Any, prompt: str, metadata: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """submit() awaited from an event loop."""
        return await asyncio.wrap_future(self.submit(image, prompt, metadata))

    def flush(self) -> None:
        """Send what is pending now instead of waiting for max_wait_s."""
        with self._lock:
            pending = self._take()
        if pending:
            self._send(pending)

    def _take(self) -> list[_Sample]:
        pending, self._pending = self._pending, []
        self._generation += 1
        return pending

    def _flush_generation(self, generation: int) -> None:
        with self._lock:
            if generation != self._generation or not self._pending:
                return
            pending = self._take()
        self._send(pending)

    def _send(self, samples: list[_Sample]) -> None:
        with self._lock:
            self.stats["requests"] += 1
        try:
            future = self.client.score_async(
                [sample.entry for sample in samples],
                [sample.prompt for sample in samples],
                [sample.metadata for sample in samples],
                rewards=self.rewards,
                profile=self.profile,
            )
        except Exception as exc:  # handed to every caller of the batch
            for sample in samples:
                _settle(sample.future, exc)
            return
        future.add_done_callback(lambda done: self._resolve(samples, done))

    def _resolve(self, samples: list[_Sample], done: Future[ScoreBatch]) -> None:
        try:
            results = self._results(done.result(), [sample.prompt for sample in samples])
        except (Exception, CancelledError) as exc:
            results = [exc] * len(samples)
        for sample, result in zip(samples, results, strict=True):
            _settle(sample.future, result)

    def _results(self, batch: ScoreBatch, prompts: list[str]) -> list[dict[str, Any] | BaseException]:
        policy = self.policy
        try:
            failed = policy.check(batch, prompts)  # reports never-scorable prompts once; warns what it imputes
        except ItemsFailed:  # "raise", or "impute" with nothing valid: settled per sample below
            failed = ~batch.valid
        values = _select(batch, self.select)
        can_impute = False
        if policy.on_failure == "impute":
            try:  # the prompt's valid items in this request, else the recent valid mean (earlier requests too)
                values = policy.apply(values, failed, prompts, self.select)
                can_impute = bool(failed.any())
            except ValueError:  # nothing valid in this request, nor before it
                can_impute = False
        with self._lock:
            self.stats["failed"] += int(failed.sum())
            self.stats["imputed"] += int(failed.sum()) if can_impute else 0
        results: list[dict[str, Any] | BaseException] = []
        for index, prompt in enumerate(prompts):
            if failed[index] and not (can_impute or policy.on_failure == "nan"):
                results.append(SampleFailed(batch, index, prompt, policy.on_failure))
                continue
            results.append(
                {
                    "score": float(values[index]),
                    "error": batch.errors[index],
                    "error_code": batch.error_codes[index],
                    "imputed": bool(failed[index] and can_impute),
                    "valid": bool(batch.valid[index]),
                }
            )
        return results


# -- verl / verl-omni ----------------------------------------------------------------------------------------------
def _verl_prompt(ground_truth: Any, extra_info: Any) -> str:
    """The prompt an image was generated from: verl-omni's image rewards read it from ground_truth; else
    extra_info's "prompt" / "raw_prompt"."""
    if isinstance(ground_truth, str) and ground_truth:
        return ground_truth
    if isinstance(extra_info, Mapping):
        for key in ("prompt", "raw_prompt"):
            if isinstance(extra_info.get(key), str):
                return extra_info[key]
    raise TypeError(
        f"no prompt for this sample: ground_truth is {type(ground_truth).__name__} {ground_truth!r} and extra_info "
        "has no 'prompt' string"
    )


class CoalescerOptions(TypedDict, total=False):
    """ScoreCoalescer's options, as the per-sample adapters take them (see ScoreCoalescer for each)."""

    rewards: str | RewardSpec | None
    profile: str | None
    on_failure: str
    max_batch: int
    max_wait_s: float
    select: str


def verl_compute_score(client: RewardClient, **options: Unpack[CoalescerOptions]) -> Callable[..., Any]:
    """An async `compute_score(data_source, solution_image, ground_truth, extra_info=None, **kwargs) -> dict` for
    verl-omni's VisualRewardManager (verl_omni/reward_loop/reward_manager/visual.py, run_single; see the module
    docstring). It is a real `async def`, so the manager's `inspect.iscoroutinefunction` check awaits it on its
    event loop; the concurrent per-sample calls are coalesced into batched POST /score requests (ScoreCoalescer,
    `compute_score.coalescer`).

    solution_image: one image (verl-omni's uint8 pixel tensor [C, H, W], or a float array in [0, 1], PIL image...).
    ground_truth: the prompt (else extra_info["prompt"]). extra_info["metadata"] (a dict), when present, is sent as
    the item's GenEval-style metadata. Extra keyword arguments (reward_router_address, reward_model_tokenizer,
    model_name, sampling_params) are accepted and ignored: the service is the reward model.

    Returns {"score": float, "error": str | None, "error_code": str | None, "imputed": bool, "valid": bool}; verl
    takes "score" as the reward and logs the other keys in reward_extra_info. on_failure: see ScoreCoalescer ("raise":
    the failed sample's await raises SampleFailed; "impute": the mean of its batch's valid samples with the same
    prompt, else of all its valid samples, imputed=True; "nan": score NaN).

    Usage: a file named by `custom_reward_function.path`, with `custom_reward_function.name=compute_score`:

        compute_score = verl_compute_score(RewardClient(os.environ["REWARDSCOPE_URL"]), on_failure="impute")
    """
    coalescer = ScoreCoalescer(client, **options)

    async def compute_score(
        data_source: Any, solution_image: Any, ground_truth: Any, extra_info: Any = None, **kwargs: Any
    ) -> dict[str, Any]:
        del data_source, kwargs
        metadata = extra_info.get("metadata") if isinstance(extra_info, Mapping) else None
        prompt = _verl_prompt(ground_truth, extra_info)
        return await coalescer.ascore(solution_image, prompt, metadata if isinstance(metadata, Mapping) else None)

    compute_score.coalescer = coalescer  # type: ignore[attr-defined]
    return compute_score


# -- DanceGRPO -----------------------------------------------------------------------------------------------------
class DanceGRPOReward:
    """reward_fn(image, prompt) -> float32 tensor [1]: one decoded image (PIL, as DanceGRPO's
    sample_reference_model has it) and its caption, the shape DanceGRPO appends to `all_rewards`
    (fastvideo/train_grpo_flux.py; see the module docstring). Drop-in:

        all_rewards.append(reward_fn(decoded_image[0], batch_caption[0]))

    Calls from several threads at once are coalesced into batched POST /score requests (ScoreCoalescer).
    `submit(image, prompt)` returns a Future of the tensor at once, so the next image can be sampled while this one
    is scored (resolve the futures before torch.cat). DanceGRPO's loop scores one image at a time: under "impute" a
    failed image takes the mean of its prompt's valid samples batched with it, else the recent valid mean (only a
    failure before anything valid was scored raises). `details(image, prompt)` returns the
    sample's dict (score, error, imputed, valid); `coalescer.stats` counts failed and imputed samples.
    """

    def __init__(self, coalescer: ScoreCoalescer, device: Any = None) -> None:
        self.coalescer, self.device = coalescer, device

    def _tensor(self, result: dict[str, Any]) -> Any:
        import torch  # the trainer's tensors: torch is importable wherever this adapter is used

        return torch.tensor([result["score"]], dtype=torch.float32, device=self.device)

    def submit(self, image: Any, prompt: str, metadata: Mapping[str, Any] | None = None) -> Future[Any]:
        """The reward in the background: a Future of the float32 tensor [1]."""
        return _then(self.coalescer.submit(image, prompt, metadata), self._tensor)

    def details(self, image: Any, prompt: str, metadata: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The sample's result dict (blocking)."""
        return self.coalescer.submit(image, prompt, metadata).result()

    def __call__(self, image: Any, prompt: str, metadata: Mapping[str, Any] | None = None) -> Any:
        return self.submit(image, prompt, metadata).result()


def dancegrpo_reward(client: RewardClient, device: Any = None, **options: Unpack[CoalescerOptions]) -> DanceGRPOReward:
    """A DanceGRPO per-image reward: reward_fn(image, prompt) -> float32 tensor [1] on `device` (DanceGRPO keeps
    its rewards on the GPU: pass `device`). on_failure: "raise" | "impute" | "nan" (see ScoreCoalescer)."""
    return DanceGRPOReward(ScoreCoalescer(client, **options), device)


# -- AlignProp -----------------------------------------------------------------------------------------------------
@functools.cache
def _policy_remote_reward() -> Any:
    """RemoteReward's autograd path (POST /grad via client.grad) with the failure policy applied; built on first
    use so that importing this module does not import torch."""
    import torch

    class PolicyRemoteReward(torch.autograd.Function):
        """apply(pixels [B, 3, H, W] float32 in [0, 1], prompts, adapter, info) -> total reward float32 [B].

        Failed items follow adapter.policy: "raise" raises ItemsFailed; "impute" gives them the mean of the valid
        items (their prompt's first) and no gradient; "nan" leaves NaN. `info` (a dict) receives the metadata."""

        @staticmethod
        def forward(ctx: Any, pixels: Any, prompts: list[str], adapter: AlignPropRewardFunction, info: dict) -> Any:
            batch = adapter.client.grad(pixels.detach(), prompts, rewards=adapter.rewards, profile=adapter.profile)
            failed = adapter.policy.check(batch, prompts)
            values = adapter.policy.apply(batch.total, failed, prompts)
            grads = np.stack(batch.grads).astype(np.float32, copy=False)
            grads[failed] = 0.0  # imputed (or NaN) items carry no gradient
            info.update(batch_info(batch), imputed=adapter.policy.imputed(failed))
            ctx.save_for_backward(torch.from_numpy(grads).to(pixels.device))
            return torch.from_numpy(np.asarray(values, dtype=np.float32)).to(pixels.device)

        @staticmethod
        def backward(ctx: Any, grad_output: Any) -> Any:
            (grads,) = ctx.saved_tensors
            return grad_output.to(grads.dtype)[:, None, None, None] * grads, None, None, None

    return PolicyRemoteReward


class AlignPropRewardFunction:
    """reward_fn(images, prompts, prompt_metadata) -> (reward, metadata): TRL AlignPropTrainer's `reward_function`
    (trl < 0.24; compute_rewards unpacks the pair, calculate_loss is `10.0 - rewards.mean()`, see the module
    docstring). A tuple, never a bare tensor: unpacking a tensor [B] as a pair would silently take image 0's reward
    as the reward and image 1's as the metadata.

    images: a tensor [B, 3, H, W] (float32, float16 or bfloat16) in `pixel_range`, carrying the gradient of the
    sampling chain. reward: float32 [B] on the images' device, differentiable in the images through POST /grad
    (the served differentiable rewards' weighted total); backward() puts the gradient on the images in their dtype.
    metadata: a dict (batch_info: errors, valid, versions ... and `imputed`).

    Failed items: "raise" (default) raises ItemsFailed naming them; "impute" gives each the mean of the valid items
    (its prompt's first), a finite value without gradient, marked in metadata["imputed"]; "nan" leaves NaN (the loss
    is then NaN: mask before reducing).

    The AlignProp repository's own hook is `loss_fn(im_pix, prompts) -> (loss, rewards)` on pixels in [-1, 1]; wrap
    with pixel_range=(-1.0, 1.0): `loss_fn = lambda im, p: (lambda r: (-r, r))(reward_fn(im, p)[0])`.
    """

    def __init__(
        self,
        client: RewardClient,
        rewards: str | RewardSpec | None,
        profile: str | None,
        on_failure: str = "raise",
        pixel_range: tuple[float, float] = (0.0, 1.0),
    ) -> None:
        low, high = pixel_range
        if not high > low:
            raise ValueError(f"pixel_range must be (low, high) with high > low; got {pixel_range}")
        self.client, self.rewards, self.profile = client, rewards, profile
        self.policy, self.pixel_range = FailurePolicy(on_failure), (float(low), float(high))

    def __call__(self, images: Any, prompts: Sequence[str], prompt_metadata: Any = None) -> tuple[Any, dict[str, Any]]:
        del prompt_metadata  # /grad scores the image against its prompt
        if not is_torch_tensor(images) or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"AlignProp images must be a torch tensor [B, 3, H, W]; got {type(images).__name__} "
                f"{tuple(getattr(images, 'shape', ()))}"
            )
        prompt_list = [prompts] * images.shape[0] if isinstance(prompts, str) else list(prompts)
        low, high = self.pixel_range
        pixels = images.float()  # differentiable: backward casts the gradient back to the images' dtype
        if (low, high) != (0.0, 1.0):
            pixels = (pixels - low) / (high - low)
        info: dict[str, Any] = {}
        reward = _policy_remote_reward().apply(pixels, prompt_list, self, info)
        return reward, info


def alignprop_reward_fn(
    client: RewardClient,
    rewards: str | RewardSpec | None = None,
    profile: str | None = None,
    on_failure: str = "raise",
    pixel_range: tuple[float, float] = (0.0, 1.0),
) -> AlignPropRewardFunction:
    """A TRL AlignPropTrainer `reward_function` (differentiable, through POST /grad): reward_fn(images, prompts,
    prompt_metadata) -> (float32 reward [B] with gradient to the images, metadata dict). rewards / profile: as
    RewardClient.grad (the service's differentiable rewards). on_failure: "raise" | "impute" | "nan".
    Usage: AlignPropTrainer(config, alignprop_reward_fn(RewardClient(url)), prompt_fn, pipeline)."""
    return AlignPropRewardFunction(client, rewards, profile, on_failure, pixel_range)


# -- Factories a config string can name ----------------------------------------------------------------------------
def _parse_rewards(text: str) -> str | list[str] | dict[str, float] | None:
    text = text.strip()
    if not text:
        return None
    if text.startswith("{"):
        try:
            weights = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{ENV_REWARDS} is not a JSON object of reward weights: {exc}") from None
        if not isinstance(weights, dict) or not all(isinstance(w, (int, float)) for w in weights.values()):
            raise ValueError(f"{ENV_REWARDS} must map reward names to numbers; got {text!r}")
        return {str(name): float(weight) for name, weight in weights.items()}
    return [name.strip() for name in text.split(",") if name.strip()]


def _from_env(
    url: str | None, url_env: str, rewards: Any, profile: Any, on_failure: Any, select: Any, client_options: dict
) -> tuple[RewardClient, Any, Any, str, str]:
    """The client and options: explicit arguments first, then the environment, then the defaults."""
    url = url or os.environ.get(url_env)
    if not url:
        raise ValueError(
            f"set {url_env} to the rewardscope service's URL (e.g. http://127.0.0.1:3000); optional: {ENV_TOKEN}, "
            f"{ENV_REWARDS}, {ENV_PROFILE}, {ENV_ON_FAILURE}, {ENV_SELECT}"
        )
    if rewards is None and os.environ.get(ENV_REWARDS):
        rewards = _parse_rewards(os.environ[ENV_REWARDS])
    profile = profile or os.environ.get(ENV_PROFILE) or None
    on_failure = on_failure or os.environ.get(ENV_ON_FAILURE) or "raise"
    select = select or os.environ.get(ENV_SELECT) or "total"
    FailurePolicy(on_failure)  # a wrong value fails here, when the trainer starts
    client_options.setdefault("token", os.environ.get(ENV_TOKEN) or None)
    return RewardClient(url, **client_options), rewards, profile, on_failure, select


def ddpo_pytorch_reward(
    url_env: str = ENV_URL,
    rewards: str | RewardSpec | None = None,
    profile: str | None = None,
    on_failure: str | None = None,
    select: str | None = None,
    **client_options: Any,
) -> DDPORewardFunction:
    """A ddpo-pytorch reward factory: called with no arguments, as ddpo-pytorch's
    `getattr(ddpo_pytorch.rewards, config.reward_fn)()` does (kvablack/ddpo-pytorch scripts/train.py), it returns
    `reward_fn(images, prompts, metadata) -> (rewards, metadata)`: float32 rewards [B] on the images' device, the
    metadata dict of rewardscope_client.adapters.DDPORewardFunction.

    Configured from the environment so a config string selects it without editing the trainer:
    REWARDSCOPE_URL (required; `url_env` renames it), REWARDSCOPE_TOKEN, REWARDSCOPE_CLIENT_REWARDS ("matching,clip"
    or '{"matching": 1.0, "clip": 0.5}'), REWARDSCOPE_CLIENT_PROFILE, REWARDSCOPE_CLIENT_ON_FAILURE (raise | impute |
    nan; default raise), REWARDSCOPE_CLIENT_SELECT ("total" or a reward's name). Arguments override the
    environment; client_options go to RewardClient.

    Expose it under a name in ddpo_pytorch/rewards.py (one line, the trainer unchanged):

        import rewardscope_client.trainers
        rewardscope = rewardscope_client.trainers.ddpo_pytorch_reward

    then `config.reward_fn = "rewardscope"` (e.g. `--config.reward_fn=rewardscope`).
    """
    client, rewards, profile, on_failure, select = _from_env(
        None, url_env, rewards, profile, on_failure, select, client_options
    )
    return ddpo_reward_fn(client, rewards, profile, select, on_failure)


def _metadata_list(metadata: Any, count: int) -> list[Any] | None:
    """flow_grpo passes per-sample metadata dicts, or (its rewards.py main()) one dict for the whole call."""
    if metadata is None or isinstance(metadata, Mapping):
        return None
    items = list(metadata)
    return items if len(items) == count else None


def flow_grpo_score(
    device: Any = None,
    url: str | None = None,
    rewards: str | RewardSpec | None = None,
    profile: str | None = None,
    on_failure: str | None = None,
    select: str | None = None,
    url_env: str = ENV_URL,
    **client_options: Any,
) -> Callable[..., tuple[list[float], dict[str, Any]]]:
    """A flow_grpo scorer entry: multi_score(device, score_dict) builds it as `flow_grpo_score(device)` (its
    parameters include `device`, which multi_score checks in `__code__.co_varnames`) and calls
    `scores, info = fn(images, prompts, metadata)`: scores a list of floats (multi_score weights each), info a dict
    (batch_info and `imputed`). device is accepted and unused (the service scores; the scores are a list).

    url (else the environment, as ddpo_pytorch_reward reads it), rewards, profile, on_failure ("raise" default,
    "impute", "nan"), select ("total" or a reward's name). Register the function itself (multi_score reads
    `__code__`, so not a functools.partial) in flow_grpo/rewards.py's multi_score table:

        "rewardscope": rewardscope_client.trainers.flow_grpo_score,

    then name it in the config: `config.reward_fn = {"rewardscope": 1.0}`.
    """
    del device
    client, rewards, profile, on_failure, select = _from_env(
        url, url_env, rewards, profile, on_failure, select, client_options
    )
    policy = FailurePolicy(on_failure)

    def score(images: Any, prompts: Sequence[str], metadata: Any = None) -> tuple[list[float], dict[str, Any]]:
        prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
        batch = client.score(
            images, prompt_list, _metadata_list(metadata, len(prompt_list)), rewards=rewards, profile=profile
        )
        failed = policy.check(batch, prompt_list)
        values = policy.apply(_select(batch, select), failed, prompt_list)
        return [float(value) for value in values], {**batch_info(batch), "imputed": policy.imputed(failed)}

    return score
