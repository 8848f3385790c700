"""VLM judge rewards in process: ``100 * sigmoid(logit_Yes - logit_No)`` of a chat VLM asked a yes/no question.

This is FDFO's own reward (its official trainer, NVlabs/finite-difference-flow-optimization at 740e22f):
``fdfo/rewards.py:77-100`` resizes the [0, 1] images to 504 x 504 (bilinear, ``align_corners=False``), calls the
Qwen2.5-VL processor with ``do_rescale=False, do_resize=False``, runs the bf16 model with left padding and takes
``100 * sigmoid(logits[:, -1, vocab["Yes"]] - logits[:, -1, vocab["No"]])``; the chat template is
``fdfo/rewards.py:89``. The questions are ``fdfo/config.py:71-76`` (the trained alignment question) and
``eval/calculate_metrics.py:27-31`` (the evaluation metrics ``vlm_quality`` and ``vlm_photo``; note that the
evaluation's alignment question says "Answer with Yes or No." where the trained one says "Answer Yes or No.":
:data:`VLM_ALIGNMENT_EVAL_QUESTION`).

Two preprocessing paths:

- ``torch`` (Qwen2-VL / Qwen2.5-VL and any model fed Qwen2-VL-style flat patches + ``image_grid_thw``): the image
  processor's arithmetic (normalise with its mean/std, cut ``patch_size`` patches grouped by ``merge_size``, repeat
  over ``temporal_patch_size``) done here in torch on the model's device, so ``score_differentiable`` gives
  d(reward)/d(image) (DIDR) and nothing goes through PIL/numpy. Only the tokenizer and the image processor's
  config are read, so it runs without torchvision.
- ``processor`` (any other chat VLM: ``AutoProcessor`` + ``AutoModelForImageTextToText``): the processor does
  everything, through numpy, so the reward is declared non-differentiable and DIDR refuses it at startup.

The judge is frozen (``requires_grad_(False)``, eval mode): it never holds optimizer state, and its scores do not
depend on the batch it is scored in (up to the floating-point reduction order of a bf16 GPU matmul).
"""
from __future__ import annotations

import inspect
import os
import threading
from typing import Sequence

import torch
import torch.nn.functional as F

from engine.errors import ConfigError

#: the preset questions; ``{prompt}`` is the generation prompt (fdfo/config.py:73, eval/calculate_metrics.py:28-30)
VLM_QUESTIONS = {
    "vlm_alignment": 'Does this image match the caption "{prompt}"? Answer Yes or No.',
    "vlm_quality": "Is this image of professional quality? Answer with Yes or No.",
    "vlm_photo": "Does this image look photorealistic? Answer with Yes or No.",
}
#: the alignment question of the official evaluation (eval/calculate_metrics.py:28), not the trained one
VLM_ALIGNMENT_EVAL_QUESTION = 'Does this image match the caption "{prompt}"? Answer with Yes or No.'
#: Qwen2(.5)-VL's chat framing with one image before the question (fdfo/rewards.py:89)
QWEN_TEMPLATE = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                 "<|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n")
QWEN_IMAGE_TOKEN = "<|image_pad|>"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def answer_token_id(tokenizer, word: str, where: str) -> int:
    """The id of ``word`` as ONE token of ``tokenizer`` (ConfigError when it is several tokens, none, or unknown)."""
    ids = tokenizer.encode(word, add_special_tokens=False)
    unk = getattr(tokenizer, "unk_token_id", None)
    if len(ids) != 1 or (unk is not None and ids[0] == unk):
        pieces = tokenizer.convert_ids_to_tokens(ids) if ids else []
        raise ConfigError(f"{where}: the answer {word!r} is {len(ids)} token(s) {pieces} in this tokenizer, but the "
                          f"Yes/No logit difference needs each answer to be exactly one known token (set yes=/no= "
                          f"to single-token spellings)")
    return int(ids[0])


class VlmYesNoReward:
    """``VlmYesNoReward(path, question, ...)``: ``scale * sigmoid(logit(yes) - logit(no))`` at the last position.

    ``path``: a local model directory (config, weights, tokenizer, ``preprocessor_config.json``) or a cached HF id.
    ``question``: the user turn after the image; ``{prompt}`` is replaced by the generation prompt.
    ``template``: ``"auto"`` (``qwen`` on the torch path, ``chat`` on the processor path), ``"qwen"``
    (:data:`QWEN_TEMPLATE`), ``"chat"`` (the processor's chat template with one image then the question; processor
    path only) or a string holding ``{question}`` and, for the torch path, ``<|image_pad|>`` once.
    ``image_size``: the square side images are resized to first (504 = 36 x 14 patches = 324 LLM tokens, FDFO's
    value); ``None`` keeps the decoder's size (torch path: it must be a multiple of patch_size * merge_size;
    processor path: the processor resizes, e.g. LLaVA's CLIP crop).
    ``preprocess``: ``auto`` (torch when the image processor is Qwen2-VL-style), ``torch`` or ``processor``.
    ``differentiable``: None = whatever the path allows; False forces non-differentiable.
    ``device``: the judge's own device (e.g. ``cuda:1``; serve it with ``engine.rewards.server`` to put it on
    other machines); ``dtype``: bfloat16 as FDFO runs it; ``batch_size``: images per forward.
    """

    def __init__(self, path: str, question: str | None = None, *, name: str = "vlm_yesno", template: str = "auto",
                 image_size: int | None = 504, yes: str = "Yes", no: str = "No", scale: float = 100.0,
                 device: str = "cpu", dtype: str = "bfloat16", batch_size: int = 8, preprocess: str = "auto",
                 differentiable: bool | None = None) -> None:
        where = f"reward {name}"
        if not isinstance(question, str) or not question:
            raise ConfigError(f"{where}: 'question' must be a non-empty string (use {{prompt}} for the prompt), "
                              f"got {question!r}")
        try:
            question.format(prompt="x")
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(f"{where}: question {question!r} may only hold the field {{prompt}} ({e})") from None
        if dtype not in _DTYPES:
            raise ConfigError(f"{where}: dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        if preprocess not in ("auto", "torch", "processor"):
            raise ConfigError(f"{where}: preprocess must be auto, torch or processor, got {preprocess!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"{where}: batch_size must be an integer >= 1, got {batch_size!r}")
        if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
            raise ConfigError(f"{where}: image_size must be a positive integer or null, got {image_size!r}")
        if not isinstance(path, str) or ((os.path.isabs(path) or path.startswith(".")) and not os.path.isdir(path)):
            raise FileNotFoundError(f"{where}: model directory {path!r} does not exist")
        from transformers import AutoImageProcessor, AutoTokenizer

        self.name, self.question, self.scale = name, question, float(scale)
        self.image_size, self.batch_size = image_size, batch_size
        self.device, self.dtype = torch.device(device), _DTYPES[dtype]
        self.image_processor = AutoImageProcessor.from_pretrained(path)
        qwen_style = all(hasattr(self.image_processor, a) for a in ("patch_size", "merge_size", "temporal_patch_size"))
        self.preprocess = ("torch" if qwen_style else "processor") if preprocess == "auto" else preprocess
        if self.preprocess == "torch" and not qwen_style:
            raise ConfigError(f"{where}: preprocess 'torch' needs a Qwen2-VL-style image processor (patch_size, "
                              f"merge_size, temporal_patch_size), but {path!r} has "
                              f"{type(self.image_processor).__name__}; use preprocess: processor")
        if self.preprocess == "processor":
            from transformers import AutoProcessor
            self.processor = AutoProcessor.from_pretrained(path)
            self.tokenizer = self.processor.tokenizer
        else:
            self.processor = None
            self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.padding_side = "left"  # the last position is every row's last real token
        # refuse a tokenizer that splits an answer before loading the (large) model
        self.yes_id = answer_token_id(self.tokenizer, yes, where)
        self.no_id = answer_token_id(self.tokenizer, no, where)
        if self.yes_id == self.no_id:
            raise ConfigError(f"{where}: yes={yes!r} and no={no!r} are the same token")
        self.template = self._template(template, where)

        from transformers import AutoModelForImageTextToText
        self.model = AutoModelForImageTextToText.from_pretrained(path, dtype=self.dtype).to(self.device)
        self.model.eval().requires_grad_(False)  # a judge: no grads of its own, no optimizer state
        params = inspect.signature(self.model.forward).parameters
        self._logits_to_keep = "logits_to_keep" in params
        self._mm_token_type_ids = "mm_token_type_ids" in params
        if self.preprocess == "torch":
            self._check_image_token(where)
        self.differentiable = self.preprocess == "torch" and differentiable is not False
        # Qwen2-VL keeps per-call state (rope_deltas) on the model: one forward at a time (async workers, servers)
        self._lock = threading.Lock()

    # ---------------------------------------------------------------------------------------------------------
    def _template(self, template: str, where: str) -> str:
        if template == "auto":
            template = "qwen" if self.processor is None else "chat"
        if template == "qwen":
            return QWEN_TEMPLATE
        if template == "chat":
            if self.processor is None:
                raise ConfigError(f"{where}: template 'chat' needs preprocess: processor (the torch path frames the "
                                  f"question itself: use 'qwen' or a template string)")
            return "chat"
        if "{question}" not in template:
            raise ConfigError(f"{where}: a template string must contain {{question}}, got {template!r}")
        if self.processor is None and template.count(QWEN_IMAGE_TOKEN) != 1:
            raise ConfigError(f"{where}: the template must hold the image placeholder {QWEN_IMAGE_TOKEN} exactly once")
        return template

    def _check_image_token(self, where: str) -> None:
        tok_id = self.tokenizer.convert_tokens_to_ids(QWEN_IMAGE_TOKEN)
        cfg_id = getattr(self.model.config, "image_token_id", None)
        if cfg_id is None or tok_id != cfg_id:
            raise ConfigError(f"{where}: the tokenizer's {QWEN_IMAGE_TOKEN} is id {tok_id} but the model's "
                              f"image_token_id is {cfg_id}; the model and tokenizer do not belong together")
        self.image_token_id = int(cfg_id)

    def questions(self, prompts: Sequence[str]) -> list[str]:
        return [self.question.format(prompt=p) for p in prompts]

    def _resize(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, torch.float64 if images.dtype == torch.float64 else torch.float32)
        if self.image_size is not None and tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return x

    def pixel_patches(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, 3, H, W] in [0, 1] (already resized) -> (flat patches [N * gh * gw, C * T * p * p], grid [N, 3]):
        the Qwen2-VL image processor's normalise + patchify (transformers' ``Qwen2VLImageProcessor.patchify`` and
        its PIL twin), in torch and differentiable."""
        ip = self.image_processor
        p, m, t = int(ip.patch_size), int(ip.merge_size), int(ip.temporal_patch_size)
        n, c, h, w = images.shape
        if h % (p * m) or w % (p * m):
            raise ValueError(f"{self.name}: images of {h}x{w} pixels are not multiples of patch_size * merge_size "
                             f"= {p * m}; set image_size to a multiple of {p * m}")
        mean = torch.tensor(ip.image_mean, device=images.device, dtype=images.dtype).view(1, c, 1, 1)
        std = torch.tensor(ip.image_std, device=images.device, dtype=images.dtype).view(1, c, 1, 1)
        x = (images - mean) / std if getattr(ip, "do_normalize", True) else images
        gh, gw = h // p, w // p
        x = x.reshape(n, c, gh // m, m, p, gw // m, m, p).permute(0, 2, 5, 3, 6, 1, 4, 7)
        x = x.unsqueeze(6).expand(*x.shape[:6], t, p, p)  # one still frame repeated over the temporal patch
        grid = torch.tensor([[1, gh, gw]] * n, dtype=torch.long, device=images.device)
        return x.reshape(n * gh * gw, c * t * p * p), grid

    def _inputs_torch(self, images: torch.Tensor, prompts: Sequence[str]) -> dict:
        pixels, grid = self.pixel_patches(images)
        m = int(self.image_processor.merge_size)
        n_tokens = int(grid[0, 1] * grid[0, 2]) // (m * m)
        texts = [self.template.format(question=q).replace(QWEN_IMAGE_TOKEN, QWEN_IMAGE_TOKEN * n_tokens)
                 for q in self.questions(prompts)]
        # the template carries all framing: no BOS/EOS added (an appended EOS would move the last position)
        enc = self.tokenizer(texts, padding=True, add_special_tokens=False, return_tensors="pt")
        inputs = {"input_ids": enc["input_ids"].to(self.device),
                  "attention_mask": enc["attention_mask"].to(self.device),
                  "pixel_values": pixels.to(self.dtype), "image_grid_thw": grid}
        if self._mm_token_type_ids:
            inputs["mm_token_type_ids"] = (inputs["input_ids"] == self.image_token_id).int()
        return inputs

    def _inputs_processor(self, images: torch.Tensor, prompts: Sequence[str]) -> dict:
        qs = self.questions(prompts)
        if self.template == "chat":
            texts = [self.processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                add_generation_prompt=True, tokenize=False) for q in qs]
        else:
            texts = [self.template.format(question=q) for q in qs]
        kw = {"do_rescale": False}
        if self.image_size is not None:
            kw["do_resize"] = False  # resized here, as FDFO does
        inputs = self.processor(text=texts, images=list(images.detach().float().cpu()), padding=True,
                                images_kwargs=kw, return_tensors="pt")
        return {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                for k, v in inputs.items() if isinstance(v, torch.Tensor)}

    def _scores(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.name}: expected images [N, 3, H, W] in [0, 1], got {tuple(images.shape)}")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{self.name}: {images.shape[0]} images but {len(prompts)} prompts")
        out = []
        for i in range(0, images.shape[0], self.batch_size):
            x = self._resize(images[i:i + self.batch_size])
            chunk = prompts[i:i + self.batch_size]
            inputs = self._inputs_torch(x, chunk) if self.preprocess == "torch" else self._inputs_processor(x, chunk)
            if self._logits_to_keep:
                inputs["logits_to_keep"] = 1  # only the last position's logits: [B, 1, vocab], not [B, L, vocab]
            with self._lock:
                logits = self.model(**inputs, use_cache=False, return_dict=True).logits[:, -1].float()
            out.append(self.scale * torch.sigmoid(logits[:, self.yes_id] - logits[:, self.no_id]))
        return torch.cat(out)

    def score(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            s = self._scores(images.detach(), prompts)
        return {self.name: s.float().cpu()}

    def score_differentiable(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict]
                             ) -> torch.Tensor:
        """[N] float32 scores on the judge's device with autograd through ``images`` (torch path only)."""
        if not self.differentiable:
            raise TypeError(f"{self.name} is not differentiable here (preprocess={self.preprocess!r}: the processor "
                            f"works in numpy); use a Qwen2-VL-style judge with preprocess: torch")
        return self._scores(images, prompts)


def _preset(key: str):
    def build(path: str, **kwargs) -> VlmYesNoReward:
        kwargs.setdefault("name", key)
        if "question" in kwargs:
            raise ConfigError(f"reward {key}: the question is the preset's own ({VLM_QUESTIONS[key]!r}); use "
                              f"vlm_yesno to ask another one")
        return VlmYesNoReward(path, VLM_QUESTIONS[key], **kwargs)
    build.__name__ = build.__qualname__ = key
    build.__doc__ = f"``{key}``: :class:`VlmYesNoReward` asking {VLM_QUESTIONS[key]!r}."
    return build


vlm_alignment = _preset("vlm_alignment")
vlm_quality = _preset("vlm_quality")
vlm_photo = _preset("vlm_photo")
