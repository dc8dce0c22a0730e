"""The LLaVA teacher (SPEC section 3): C_vlm from a LLaVA-1.5-style checkpoint's attention.

For each image the VLM reads a conversation rendered with the checkpoint's own chat template:
user = image + prompt, assistant = a teacher-forced response. Classification (Eq. 11):
"Classify foreground vs. background" / "foreground: <class>, background: <words>"; dense
(Eq. 12): "Locate all <obj> instances" / "objects: <obj>, <obj>, background: <words>", with the
boxes drawn on the image. One forward pass per batch; the language model runs eager attention
and a forward hook on every selected decoder layer's self-attention reduces its (B, H, S, S)
weights at once to (spans x image tokens), averaged over heads and span tokens, so memory does
not grow with the number of layers. C_span is the average over the selected layers;
C_vlm = relu(C_fore - C_back) / ||.||_1 (dense: relu(sum_k C_obj_k - C_back) / ||.||_1), on the
vision grid, with the geometry the processor actually used (pad / resize / crop).

Images are padded to a square first by default (`pad="square"`), as the original LLaVA-1.5
does and SPEC section 3 assumes (the llava-hf processors otherwise resize the short side and
centre-crop, so the borders of a non-square image get no teacher mass): through the image
processor's `do_pad` where it has one, else by padding with its mean colour before it.
`pad="processor"` keeps the checkpoint's own preprocessing. Either way the stored geometry is
the one actually used.

torch and transformers are imported lazily (llava_runtime); llava_conv (text, geometry,
Eq. 11/12) and llava_export (the export backend, which imports this module) are torch-free.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from lfi_jax.teacher import llava_conv as conv
from lfi_jax.teacher.llava_runtime import DTYPES, Capture, _torch, model_fingerprint, resolve_device_dtype
from lfi_jax.teacher.types import TeacherEntry

IMAGE_PADS = ("square", "processor")

class LlavaTeacher:
    """A LLaVA-1.5-style checkpoint that turns images into teacher maps (SPEC section 3).

    model_path: a hub id or a local directory holding the model *and* its processor.
    task: "classify" (Eq. 11) or "dense" (Eq. 12, needs boxes).
    layers: language-model layers to average ("all", "0,5", "16:32", or a list of ints).
    background: "fixed" (use `background_words`) or "generate" (greedy words from the VLM,
      continuing the teacher-forced response; recorded per example in meta).
    pad: "square" (pad the image to a square first, like the original LLaVA-1.5) or
      "processor" (the checkpoint's own preprocessing, e.g. llava-hf's resize and centre crop).
    """

    def __init__(
        self,
        model_path: str,
        *,
        revision: str | None = None,
        dtype: str = "auto",
        device: str = "auto",
        layers: str | Sequence[int] | None = "all",
        task: str = "classify",
        prompt: str | None = None,
        response_template: str | None = None,
        background: str = "fixed",
        background_words: str = conv.DEFAULT_BACKGROUND_WORDS,
        background_max_tokens: int = 8,
        box_color: str | Sequence[int] = "red",
        box_width: int = 0,
        batch_size: int = 8,
        pad: str = "square",
        model=None,
    ):
        """`model`: an already built LlavaForConditionalGeneration (eager attention in its
        language model) to use instead of loading weights from `model_path`; the processor
        and config still come from `model_path` (benchmarks with random weights use this)."""
        torch, transformers = _torch()
        model_path = str(model_path)
        # A local directory is recorded by its absolute path (a resume from another working
        # directory is the same export); anything else is a hub id.
        self.model_path = os.path.abspath(model_path) if os.path.isdir(model_path) else model_path
        self.revision = revision
        self.task = task
        default_prompt = conv.CLASSIFY_PROMPT if task == "classify" else conv.DENSE_PROMPT
        self.prompt = prompt if prompt is not None else default_prompt
        default_response = conv.CLASSIFY_RESPONSE if task == "classify" else conv.DENSE_RESPONSE
        self.response_template = response_template if response_template is not None else default_response
        conv.check_templates(task, self.prompt, self.response_template)
        if background not in ("fixed", "generate"):
            raise ValueError(f"--background must be 'fixed' or 'generate', got {background!r}")
        self.background = background
        self.background_words = " ".join(str(background_words).split())
        if not self.background_words:
            raise ValueError("--background-words must not be empty")
        self.background_max_tokens = int(background_max_tokens)
        self.box_color = conv.parse_color(box_color)
        self.box_width = int(box_width)
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
        if pad not in IMAGE_PADS:
            raise ValueError(f"--pad must be one of {IMAGE_PADS}, got {pad!r}")
        self.image_pad = pad
        self.device, self.torch_dtype, self.dtype_name = resolve_device_dtype(device, dtype)

        where = f"model {self.model_path!r}" + (f" (revision {revision})" if revision else "")
        try:
            config = model.config if model is not None else transformers.AutoConfig.from_pretrained(
                self.model_path, revision=revision
            )
        except Exception as e:
            raise ValueError(f"{where}: cannot load its config: {type(e).__name__}: {e}") from e
        if getattr(config, "model_type", None) != "llava":
            raise ValueError(
                f"{where} is a {getattr(config, 'model_type', '?')!r} checkpoint; the llava teacher "
                "supports LLaVA-1.5-style ('llava') checkpoints"
            )
        try:
            processor = transformers.AutoProcessor.from_pretrained(self.model_path, revision=revision)
        except Exception as e:
            raise ValueError(
                f"{where}: cannot load its processor (preprocessor/processor config, tokenizer): "
                f"{type(e).__name__}: {e}"
            ) from e
        if not hasattr(processor, "image_processor") or not hasattr(processor, "tokenizer"):
            raise ValueError(f"{where}: has no processor with an image processor and a tokenizer "
                             f"(got {type(processor).__name__})")
        if not getattr(processor, "chat_template", None):
            raise ValueError(f"{where}: the processor has no chat template")
        if not getattr(processor.tokenizer, "is_fast", False):
            raise ValueError(f"{where}: needs a fast tokenizer (character offsets locate the spans)")
        if getattr(processor, "patch_size", None) is None:
            patch = getattr(getattr(config, "vision_config", None), "patch_size", "?")
            raise ValueError(
                f"{where}: its processor has no patch_size, so it cannot expand the image token; set "
                f'"patch_size": {patch} (the vision tower\'s) and "vision_feature_select_strategy": '
                f'"{getattr(config, "vision_feature_select_strategy", "default")}" in its processor_config.json'
            )
        ip = processor.image_processor
        # pad="square": the processor's own pad where it has one, else padding before it
        self.pad_before = False
        if pad == "square":
            if hasattr(ip, "pad_to_square") and hasattr(ip, "do_pad"):
                ip.do_pad = True
            else:
                self.pad_before = True
        self.pad_fill = tuple(int(255 * float(m)) for m in (getattr(ip, "image_mean", None) or (0, 0, 0)))
        processor.tokenizer.padding_side = "left"
        if processor.tokenizer.pad_token_id is None:
            processor.tokenizer.pad_token = processor.tokenizer.eos_token or processor.tokenizer.unk_token
        self.processor = processor
        if model is None:
            model = transformers.LlavaForConditionalGeneration.from_pretrained(
                self.model_path,
                revision=revision,
                dtype=self.torch_dtype,
                attn_implementation={"text_config": "eager", "vision_config": "sdpa"},
            )
        elif getattr(model.config.text_config, "_attn_implementation", None) != "eager":
            raise ValueError(f"{where}: the given model's language model must use eager attention")
        self.model = model.to(self.device).eval()
        self.config = self.model.config
        self.image_token_id = int(self.config.image_token_id)
        strategy = self.config.vision_feature_select_strategy
        self.grid_h, self.grid_w, self.extra_tokens = conv.vision_grid(self.config.vision_config, strategy)
        self.num_image_tokens = self.grid_h * self.grid_w + self.extra_tokens
        patch = int(self.config.vision_config.patch_size)
        self.pixel_hw = (self.grid_h * patch, self.grid_w * patch)
        self.decoder_layers = self._decoder_layers()
        self.layers = conv.parse_layers(layers, len(self.decoder_layers))
        self.commit = getattr(self.config, "_commit_hash", None)
        self._capture = Capture()
        self._handles = [
            self.decoder_layers[i].self_attn.register_forward_hook(self._capture.hook) for i in self.layers
        ]

    def _decoder_layers(self):
        lm = getattr(getattr(self.model, "model", None), "language_model", None)
        if lm is None or not hasattr(lm, "layers"):
            lm = getattr(getattr(self.model, "language_model", None), "model", None)
        if lm is None or not hasattr(lm, "layers"):
            raise ValueError(f"model {self.model_path!r}: cannot find the language model's decoder layers")
        return list(lm.layers)

    # ------------------------------------------------------------------ provenance

    def provenance(self) -> dict[str, Any]:
        """What the manifest records about the teacher (the store adds data, counts, hash)."""
        torch, transformers = _torch()
        template = self.processor.chat_template
        return {
            "teacher": "llava",
            "model": self.model_path,
            "revision": self.revision,
            "commit": self.commit,
            "model_fingerprint": model_fingerprint(self.model_path),
            "dtype": self.dtype_name,
            "task": self.task,
            "prompt": self.prompt,
            "response_template": self.response_template,
            "background": self.background,
            "background_words": self.background_words,
            "background_max_tokens": self.background_max_tokens if self.background == "generate" else None,
            "box_color": list(self.box_color) if self.task == "dense" else None,
            "box_width": self.box_width if self.task == "dense" else None,
            "layers": list(self.layers),
            "num_layers": len(self.decoder_layers),
            "grid": [self.grid_h, self.grid_w],
            "image_tokens": self.num_image_tokens,
            "vision_feature_select_strategy": self.config.vision_feature_select_strategy,
            "image_pad": self.image_pad,
            "do_pad": bool(self.pad_before or getattr(self.processor.image_processor, "do_pad", False)),
            "reduction": "mean over span tokens and heads, mean over layers; Eq. 11/12 relu + L1",
            "chat_template_sha256": hashlib.sha256(str(template).encode()).hexdigest(),
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        }

    # ------------------------------------------------------------------ text

    def _objects(self, name, boxes, where: str) -> list[str]:
        if self.task == "classify":
            if not isinstance(name, str):
                raise ValueError(f"{where}: classify needs one class name, got {name!r}")
            names = [conv.clean_name(name)]
        else:
            k = 0 if boxes is None else int(np.asarray(boxes).reshape(-1, 4).shape[0])
            if k == 0:
                raise ValueError(f"{where}: the dense prompt needs at least one box")
            names = [name] * k if isinstance(name, str) else list(name)
            if len(names) != k:
                raise ValueError(f"{where}: {len(names)} object names for {k} boxes")
            names = [conv.clean_name(n) for n in names]
        if not all(names):
            raise ValueError(f"{where}: empty class name")
        return names

    def _render(self, prompt: str, response: str, *, continue_final: bool = False) -> str:
        return self.processor.apply_chat_template(
            conv.conversation(prompt, response), tokenize=False, continue_final_message=continue_final
        )

    def _prompt_for(self, objects: list[str]) -> str:
        uniq = list(dict.fromkeys(objects))
        return self.prompt.format(tgt_obj=" and ".join(uniq)) if "{tgt_obj}" in self.prompt else self.prompt

    def _generate_background(self, images, prompts, prefixes) -> list[str]:
        torch, _ = _torch()
        texts = [self._render(p, pre, continue_final=True) for p, pre in zip(prompts, prefixes)]
        enc = self.processor(text=texts, images=images, padding=True, return_tensors="pt")
        enc = {k: v.to(self.device) for k, v in enc.items()}
        enc["pixel_values"] = enc["pixel_values"].to(self.torch_dtype)
        with torch.inference_mode():
            out = self.model.generate(
                **enc, max_new_tokens=self.background_max_tokens, do_sample=False,
                pad_token_id=self.processor.tokenizer.pad_token_id,
            )
        new = out[:, enc["input_ids"].shape[1]:]
        words = []
        for row in self.processor.tokenizer.batch_decode(new, skip_special_tokens=True):
            line = row.strip().split("\n")[0]
            # Keep printable text only (a partial UTF-8 sequence decodes to U+FFFD).
            line = "".join(c for c in line if c.isprintable() and c != "\ufffd")
            words.append(" ".join(line.split()).strip(" ,.;:")[:80].strip())
        return words

    # ------------------------------------------------------------------ maps

    def maps(
        self,
        images: Sequence[np.ndarray],
        class_names: Sequence[str | Sequence[str]],
        boxes: Sequence[np.ndarray | None] | None = None,
        *,
        ids: Sequence[str] | None = None,
    ) -> list[TeacherEntry]:
        """Teacher maps for `images` (uint8 [H, W, 3]); one class name per image (dense: one
        name or one name per box). `ids` only label error messages."""
        if len(class_names) != len(images):
            raise ValueError(f"{len(images)} images but {len(class_names)} class names")
        if boxes is not None and len(boxes) != len(images):
            raise ValueError(f"{len(images)} images but {len(boxes)} box arrays")
        ids = list(ids) if ids is not None else [f"image {i}" for i in range(len(images))]
        out: list[TeacherEntry] = []
        for s in range(0, len(images), self.batch_size):
            sl = slice(s, s + self.batch_size)
            out.extend(self._batch(images[sl], class_names[sl], None if boxes is None else boxes[sl], ids[sl]))
        return out

    def _batch(self, images, names, boxes, ids) -> list[TeacherEntry]:
        prep = self.prepare(images, names, boxes, ids)
        return self.entries(prep, self.forward(prep))

    def prepare(self, images, names, boxes=None, ids=None) -> dict[str, Any]:
        """One batch's model inputs and span/image-token indices (no model forward, except
        the greedy generation of background words with --background=generate)."""
        torch, _ = _torch()
        ids = list(ids) if ids is not None else [f"image {i}" for i in range(len(images))]
        pil, geoms, objects, prompts = [], [], [], []
        for i, img in enumerate(images):
            where = f"example {ids[i]}"
            a = np.asarray(img)
            if a.ndim == 3 and a.shape[2] == 1:
                a = a[..., 0]
            if a.ndim == 2:
                a = np.repeat(a[..., None], 3, axis=2)
            if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3 or min(a.shape[:2]) < 1:
                raise ValueError(f"{where}: expected a uint8 [H, W, 3] image, got {a.dtype} {a.shape}")
            bx = None if boxes is None else boxes[i]
            objs = self._objects(names[i], bx, where)
            if self.task == "dense":
                a = conv.draw_boxes(a, bx, self.box_color, self.box_width)
            hw = a.shape[:2]
            if self.pad_before:
                a, top_left = conv.pad_to_square(a, self.pad_fill)
            pil.append(Image.fromarray(a))
            geom, out_hw = conv.processor_geometry(self.processor.image_processor, a.shape[0], a.shape[1])
            if self.pad_before:
                geom = conv.unpad_geometry(geom, top_left, hw)
            if out_hw != self.pixel_hw:
                raise ValueError(
                    f"{where}: the processor makes a {out_hw[0]}x{out_hw[1]} image of this "
                    f"{a.shape[0]}x{a.shape[1]} one but the vision tower takes "
                    f"{self.pixel_hw[0]}x{self.pixel_hw[1]}; unsupported preprocessing"
                )
            geoms.append(geom)
            objects.append(objs)
            prompts.append(self._prompt_for(objs))

        if self.background == "generate":
            pre = [conv.build_response(self.response_template, objects=o, background="x", task=self.task)
                   .prefix_before_background() for o in objects]
            generated = self._generate_background(pil, prompts, pre)
        else:
            generated = [None] * len(images)
        backgrounds = [g if g else self.background_words for g in generated]

        responses = [conv.build_response(self.response_template, objects=o, background=bgw, task=self.task)
                     for o, bgw in zip(objects, backgrounds)]
        texts = [self._render(p, r.text) for p, r in zip(prompts, responses)]
        enc = self.processor(text=texts, images=pil, padding=True, return_tensors="pt")
        input_ids, mask = enc["input_ids"], enc["attention_mask"]
        if tuple(enc["pixel_values"].shape[-2:]) != self.pixel_hw:
            raise ValueError(f"model {self.model_path!r}: the processor's output "
                             f"{tuple(enc['pixel_values'].shape)} is not {self.pixel_hw}")
        tok = self.processor.tokenizer(texts, add_special_tokens=True, return_offsets_mapping=True)
        b, seq = input_ids.shape
        rows, img_pos, roles_all = [], [], []
        for i in range(b):
            where = f"example {ids[i]}"
            pad = int((mask[i] == 0).sum())
            if pad and int(mask[i, :pad].sum()) != 0:
                raise ValueError("the tokenizer must pad on the left")
            ids_u, offs = tok["input_ids"][i], tok["offset_mapping"][i]
            where_img = [t for t, x in enumerate(ids_u) if x == self.image_token_id]
            if len(where_img) != 1:
                raise ValueError(f"{where}: the rendered chat has {len(where_img)} image tokens, expected 1")
            p0, n_img = where_img[0], self.num_image_tokens
            expected = ids_u[:p0] + [self.image_token_id] * n_img + ids_u[p0 + 1:]
            got = input_ids[i, pad:].tolist()
            if got != expected:
                raise ValueError(
                    f"{where}: the processor's token ids differ from the tokenized conversation with "
                    f"its image token expanded to {n_img} (grid {self.grid_h}x{self.grid_w}"
                    f"{' + CLS' if self.extra_tokens else ''}); spans cannot be located safely"
                )
            base = conv.locate_response(texts[i], responses[i].text, prompts[i])
            spans, roles = [], []
            for role, c0, c1 in responses[i].spans:
                toks = conv.span_token_positions(texts[i], offs, base + c0, base + c1)
                spans.append([pad + (t if t < p0 else t + n_img - 1) for t in toks])
                roles.append(role)
            rows.append(spans)
            roles_all.append(roles)
            img_pos.append(list(range(pad + p0, pad + p0 + n_img)))

        p_max = max(len(sp) for sp in rows)
        r_max = max(sum(len(s) for s in sp) for sp in rows)
        row_idx = torch.zeros((b, r_max), dtype=torch.long)
        row_w = torch.zeros((b, p_max, r_max), dtype=torch.float32)
        for i, spans in enumerate(rows):
            r = 0
            for p, toks in enumerate(spans):
                for t in toks:
                    row_idx[i, r] = t
                    row_w[i, p, r] = 1.0 / len(toks)
                    r += 1
        dev = self.device
        return {
            "inputs": {
                "input_ids": input_ids.to(dev),
                "pixel_values": enc["pixel_values"].to(dev, self.torch_dtype),
                "attention_mask": mask.to(dev),
                "position_ids": (mask.long().cumsum(-1) - 1).clamp(min=0).to(dev),
            },
            "row_idx": row_idx.to(dev),
            "row_w": row_w.to(dev),
            "img_idx": torch.tensor(img_pos, dtype=torch.long, device=dev),
            "roles": roles_all,
            "geometry": geoms,
            "background": backgrounds,
            "generated": generated,
        }

    def forward(self, prep: dict[str, Any], *, capture: bool = True, output_attentions: bool = False):
        """Runs the model on a prepared batch. capture=True: returns the per-span attention to
        the image tokens, [B, P, N] float32 numpy, averaged over the selected layers. capture=
        False runs the same forward with the hooks idle (what a plain forward costs)."""
        torch, _ = _torch()
        cap = self._capture
        if capture:
            b, p_max = prep["row_w"].shape[:2]
            cap.row_idx, cap.row_w, cap.img_idx = prep["row_idx"], prep["row_w"], prep["img_idx"]
            cap.acc = torch.zeros((b, p_max, self.num_image_tokens), dtype=torch.float32, device=self.device)
            cap.calls = 0
        try:
            with torch.inference_mode():
                out = self.model.model(**prep["inputs"], use_cache=False, output_attentions=output_attentions)
            if not capture:
                return out
            if cap.calls != len(self.layers):
                raise RuntimeError(f"captured {cap.calls} layers, expected {len(self.layers)}")
            return (cap.acc / len(self.layers)).cpu().numpy()
        finally:
            cap.acc = cap.row_idx = cap.row_w = cap.img_idx = None

    def entries(self, prep: dict[str, Any], acc: np.ndarray) -> list[TeacherEntry]:
        """Eq. 11/12 maps from `forward`'s per-span attention."""
        out = []
        for i, roles in enumerate(prep["roles"]):
            span_attn = acc[i, : len(roles), self.extra_tokens:]
            m, degenerate, reason = conv.map_from_spans(span_attn, roles)
            meta: dict[str, Any] = {}
            if self.background == "generate":
                meta["background_words"] = prep["background"][i]
                if not prep["generated"][i]:
                    meta["background_fallback"] = True  # generation was empty: fixed words used
            if reason:
                meta["degenerate_reason"] = reason
            out.append(TeacherEntry(m.reshape(self.grid_h, self.grid_w), prep["geometry"][i], degenerate, meta))
        return out

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


__all__ = ["DTYPES", "IMAGE_PADS", "LlavaTeacher", "resolve_device_dtype"]
