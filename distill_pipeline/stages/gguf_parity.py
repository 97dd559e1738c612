"""Does the GGUF behave like the merged model it was written from?

Three readers of the same prompts (raw user inputs, formatted through the merged model's chat
template with the generation prompt, as in training):

- the merged Hugging Face model and its tokenizer: the reference;
- llama.cpp (xllamacpp's in-process server, the engine the GGUF is served with);
- transformers reading the GGUF (`gguf_file=`), an independent reader of its tensors and vocabulary.

(a) Tokenization: every formatted prompt plus `PROBES` (digits, whitespace runs, tabs, newlines,
    special tokens, accents) is tokenized by the three; llama.cpp's ids must equal the merged
    tokenizer's. The chat template llama.cpp renders from the GGUF must equal the merged one.
(b) Greedy decoding of each prompt by the three (llama.cpp from its own tokens, the GGUF reader
    from the merged tokenizer's): the share of prompts whose outputs are token-for-token the
    merged model's. For F32/F16/BF16 this is the gate, with one allowance: an output that first
    differs where the merged model preferred its token by less than `ParityFloors.tie_margin`
    nats is a near-tie flipped by arithmetic, not a fault (llama.cpp multiplies F16 weights with
    F16 activations; SmolLM2 F16 flips one such tie, by <0.02 nats, in five 32-token answers).
(c) On the merged model's greedy continuation, llama.cpp is asked for its distribution at every
    position: |logprob difference| of the merged model's token (mean, max), top-k overlap, and
    top-1 agreement counted only where the merged model's top-1 beats its top-2 by more than a
    margin (near-ties flip under any quantization and say nothing). For quantized types these
    are the gate, whose floors (`ParityFloors`) are configurable.

llama.cpp is xllamacpp's server in this process, listening on 127.0.0.1 with a free port; it is
asked over that port, because /tokenize, /apply-template and the legacy /completion (whose answer
has every generated token id) are HTTP routes only.
"""

from __future__ import annotations

import gc
import json
import os
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from distill_pipeline.stages import formatting

FLOAT_TYPES = ("F32", "F16", "BF16")
# Strings whose tokenization differs between pre-tokenizers that look alike: digits (split one by
# one or in groups), runs of spaces before digits and words, tabs and newlines, special tokens in
# running text, accents.
PROBES = (
    "Hello world! 123 4567 89.01 -2e10",
    "a  1   22    333",
    "  leading and trailing  ",
    "tabs\t\there\t9\nnew\n\nlines\r\n  indented 42\n",
    "x    \n 7",
    "<|im_start|>user\nhi 1 2  3<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>after<|im_end|>",
    "Café déjà vu, naïve façade 10% — “quotes” ½",
    "don't I'll we've IT'S",
    "{\"event_type\": \"merger\", \"date\": \"2024-03-05\", \"amount\": 1250000}",
)
_LONG_LIST = 1000  # llama.cpp sorts and sends the whole list as JSON: the full vocabulary takes ~1 s
# Texts llama.cpp treats as end of generation; the merged model stops on them as well.
_EOG_TEXTS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<|end|>", "<end_of_turn>")


@dataclass(frozen=True)
class ParityFloors:
    """What a GGUF must reach; `ParityReport.failures` names every floor it misses."""

    exact_greedy: float = 0.99  # F32/F16/BF16: share of prompts decoded identically (llama.cpp, GGUF reader)
    # A first divergence where the merged model preferred its token by less than this is a near-tie
    # flipped by arithmetic (llama.cpp multiplies F16 weights with F16 activations), not a fault of
    # the file; 0 counts every difference.
    tie_margin: float = 0.05
    float_max_mean_logprob_diff: float = 0.05  # F32/F16/BF16: a wrong tensor shows here even when greedy agrees
    quantized_exact_greedy: float = 0.0  # quantized: one flipped near-tie changes the rest of an output
    confident_agreement: float = 0.95  # quantized: llama.cpp top-1 == merged top-1 where the margin is clear
    max_mean_logprob_diff: float = 0.25  # quantized: mean |logprob llama.cpp - merged| of the merged greedy token
    min_topk_overlap: float = 0.6  # quantized: mean share of the merged model's top-k in llama.cpp's top-k
    max_token_mismatches: int = 0  # strings llama.cpp tokenizes differently from the merged tokenizer
    max_template_mismatches: int = 0  # prompts whose chat template llama.cpp renders differently
    # The GGUF reader's tokenizer is transformers' rebuild of the vocabulary, which ignores some
    # pre-tokenizers llama.cpp honours (e.g. "smollm"); None reports its mismatches without gating.
    max_reader_token_mismatches: int | None = None


@dataclass
class ParityReport:
    out_type: str
    prompts: int
    max_new_tokens: int
    strings_tokenized: int = 0
    token_mismatches: list[dict] = field(default_factory=list)  # llama.cpp vs merged tokenizer
    reader_token_mismatches: list[dict] = field(default_factory=list)  # transformers-from-GGUF vs merged
    template_mismatches: list[dict] = field(default_factory=list)
    greedy_exact_llamacpp: float = 0.0
    greedy_exact_reader: float = 0.0
    divergences: list[dict] = field(default_factory=list)  # first differing token per diverging prompt
    positions: int = 0  # tokens of the merged greedy continuations scored in (c)
    mean_logprob_diff: float | None = None
    max_logprob_diff: float | None = None
    topk_overlap: float | None = None
    top_k: int = 5
    margin: float = 1.0
    confident_positions: int = 0
    confident_agreement: float | None = None
    beyond_list: int = 0  # positions whose merged token was not in llama.cpp's top _LONG_LIST
    seconds: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def failures(self, floors: ParityFloors | None = None) -> list[str]:
        """Human-readable reasons, with figures, for every floor not met; [] when the GGUF passes."""
        f = floors or ParityFloors()
        out: list[str] = []
        n = self.strings_tokenized
        if len(self.token_mismatches) > f.max_token_mismatches:
            first = self.token_mismatches[0]
            out.append(f"tokenizer: {len(self.token_mismatches)} of {n} strings tokenize differently in llama.cpp "
                       f"than in the merged tokenizer (allowed {f.max_token_mismatches}); first {first['text']!r}"
                       f"{_window(first['hf'], first['other'], 'llama.cpp')}")
        if f.max_reader_token_mismatches is not None and len(self.reader_token_mismatches) > f.max_reader_token_mismatches:
            first = self.reader_token_mismatches[0]
            out.append(f"GGUF reader tokenizer: {len(self.reader_token_mismatches)} of {n} strings differ "
                       f"(allowed {f.max_reader_token_mismatches}); first {first['text']!r}"
                       f"{_window(first['hf'], first['other'], 'transformers-from-GGUF')}")
        if len(self.template_mismatches) > f.max_template_mismatches:
            out.append(f"chat template: llama.cpp renders {len(self.template_mismatches)} of {self.prompts} prompts "
                       f"differently from the merged tokenizer (allowed {f.max_template_mismatches})")
        quantized = self.out_type not in FLOAT_TYPES
        floor = f.quantized_exact_greedy if quantized else f.exact_greedy
        for reader in ("llama.cpp", "transformers-from-GGUF"):
            faults = [d for d in self.divergences if d["reader"] == reader
                      and (d["hf_margin"] is None or d["hf_margin"] >= f.tie_margin)]
            share = 1 - len(faults) / max(1, self.prompts)
            if share < floor:
                first = faults[0]
                margin = "" if first["hf_margin"] is None else f", by {first['hf_margin']:.3f} nats"
                out.append(f"greedy ({self.out_type}): {reader} decoded {share:.0%} of {self.prompts} prompts like the "
                           f"merged model, near-ties (< {f.tie_margin} nats) aside (floor {floor:.0%}); prompt "
                           f"{first['prompt']} token {first['position']}: merged {first['hf']!r} vs {first['other']!r}"
                           f"{margin}")
        if not quantized and self.mean_logprob_diff is not None and self.mean_logprob_diff > f.float_max_mean_logprob_diff:
            out.append(f"mean |logprob difference| {self.mean_logprob_diff:.4f} nats over {self.positions} tokens "
                       f"(max allowed for {self.out_type} {f.float_max_mean_logprob_diff})")
        if quantized:
            if self.confident_agreement is not None and self.confident_agreement < f.confident_agreement:
                out.append(f"top-1 agreement where the merged model's margin > {self.margin} nats: "
                           f"{self.confident_agreement:.1%} of {self.confident_positions} positions "
                           f"(floor {f.confident_agreement:.0%})")
            if self.mean_logprob_diff is not None and self.mean_logprob_diff > f.max_mean_logprob_diff:
                out.append(f"mean |logprob difference| {self.mean_logprob_diff:.3f} nats over {self.positions} tokens "
                           f"(max allowed {f.max_mean_logprob_diff}; worst {self.max_logprob_diff:.3f})")
            if self.topk_overlap is not None and self.topk_overlap < f.min_topk_overlap:
                out.append(f"top-{self.top_k} overlap {self.topk_overlap:.1%} (floor {f.min_topk_overlap:.0%})")
        return out


def _window(hf: Sequence[int], other: Sequence[int], name: str, width: int = 8) -> str:
    at = _first_diff(hf, other) or 0
    return f" from token {at}: merged {list(hf[at:at + width])} vs {name} {list(other[at:at + width])}"


class LlamaCppServer:
    """llama.cpp serving one GGUF in this process (xllamacpp), on 127.0.0.1 with a free port."""

    def __init__(self, gguf_path: Path, n_ctx: int = 2048, threads: int | None = None, verbosity: int = -1):
        import xllamacpp

        params = xllamacpp.CommonParams()
        params.model.path = str(gguf_path)
        params.n_ctx = n_ctx
        params.n_parallel = 1  # one slot: requests run in order and reuse its KV cache
        params.warmup = False
        params.cache_ram_mib = 0  # no host-RAM prompt cache beyond the slot's own
        params.verbosity = verbosity  # -1: silent; 3 shows llama.cpp's load log
        threads = threads or max(1, min(4, os.cpu_count() or 1))
        params.cpuparams.n_threads = threads
        params.cpuparams_batch.n_threads = threads
        try:
            self._server = xllamacpp.Server(params)
        except RuntimeError as exc:
            raise RuntimeError(f"llama.cpp could not load {gguf_path} ({exc}); "
                               "LlamaCppServer(path, verbosity=3) prints its log") from exc
        self.address = self._server.listening_address

    def _post(self, path: str, body: dict) -> Any:
        request = urllib.request.Request(self.address + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read())

    def tokenize(self, text: str) -> list[int]:
        """Ids as llama.cpp encodes `text`: special tokens recognised, no BOS/EOS added."""
        tokens = self._post("/tokenize", {"content": text, "add_special": False, "parse_special": True})["tokens"]
        return [t["id"] if isinstance(t, dict) else int(t) for t in tokens]

    def apply_template(self, messages: list[dict]) -> str:
        return self._post("/apply-template", {"messages": messages})["prompt"]

    _GREEDY = {"temperature": 0.0, "top_k": 1, "repeat_penalty": 1.0, "presence_penalty": 0.0,
               "frequency_penalty": 0.0, "dry_multiplier": 0.0, "cache_prompt": True}

    def generate(self, prompt: list[int] | str, n_predict: int) -> list[int]:
        """Greedy continuation, as token ids (every one, stop token included)."""
        # The legacy /completion returns "tokens" whole; per-token entries of the OpenAI-style
        # answers leave out tokens that end inside a UTF-8 character.
        result = self._post("/completion", {"prompt": prompt, "n_predict": n_predict, "return_tokens": True,
                                            **self._GREEDY})
        return [int(t) for t in result["tokens"]]

    def next_logprobs(self, prompt: list[int], n_probs: int, filler: int) -> list[tuple[int, float]]:
        """llama.cpp's top `n_probs` (id, logprob) after `prompt`, from the raw logits, best first.

        The sampled token is forced to `filler` (a plain ASCII token) with a logit bias: llama.cpp drops
        the probabilities of a sampled token that ends inside a UTF-8 character, and the reported
        distribution is taken before the samplers, so the bias does not touch it.
        """
        result = self._post("/completion", {"prompt": prompt, "n_predict": 1, "n_probs": n_probs,
                                            "logit_bias": [[filler, 1000.0]], **self._GREEDY})
        probs = result.get("completion_probabilities") or []
        if not probs:
            raise RuntimeError(f"llama.cpp returned no probabilities: {json.dumps(result)[:300]}")
        return [(int(e["id"]), float(e["logprob"])) for e in probs[0]["top_logprobs"]]

    def close(self) -> None:
        self._server = None
        gc.collect()  # the server stops when the object is freed

    def __enter__(self) -> "LlamaCppServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def stop_token_ids(tokenizer: Any, model: Any) -> set[int]:
    """EOS of the tokenizer and generation config, plus end-of-turn tokens llama.cpp also stops on."""
    ids = {tokenizer.eos_token_id}
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in _EOG_TEXTS if t in vocab)
    return {int(i) for i in ids if i is not None}


def _until_stop(tokens: Sequence[int], stops: set[int]) -> list[int]:
    out = []
    for token in tokens:
        out.append(int(token))
        if token in stops:
            break
    return out


def _greedy_hf(model: Any, prompt_ids: list[int], max_new_tokens: int, stops: set[int], pad_id: int) -> list[int]:
    import torch
    from transformers import GenerationConfig

    # Plain argmax: no repetition penalty or other processors a generation_config may carry.
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=sorted(stops),
                              pad_token_id=pad_id)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                             generation_config=config)
    return _until_stop(out[0, len(prompt_ids):].tolist(), stops)


def _first_diff(a: Sequence[int], b: Sequence[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def check_parity(gguf_path: Path, merged_model_dir: Path, prompts: list[str], max_new_tokens: int = 32,
                 out_type: str = "F16", *, top_k: int = 5, margin: float = 1.0, n_ctx: int = 2048) -> ParityReport:
    """Compare the GGUF (through llama.cpp and through transformers' GGUF reader) with the merged model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, merged_model_dir = Path(gguf_path), Path(merged_model_dir)
    report = ParityReport(out_type=out_type.upper(), prompts=len(prompts), max_new_tokens=max_new_tokens,
                          top_k=top_k, margin=margin)
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        report.seconds[name] = round(now - clock, 3)
        clock = now

    tokenizer = AutoTokenizer.from_pretrained(merged_model_dir)
    model = AutoModelForCausalLM.from_pretrained(merged_model_dir, dtype=torch.float32).eval()
    reader_kwargs = {"gguf_file": gguf_path.name}
    reader_tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **reader_kwargs)
    reader = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **reader_kwargs).eval()
    lap("load_transformers")

    texts = [formatting.prompt_text(tokenizer, p) for p in prompts]
    hf_prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    stops = stop_token_ids(tokenizer, model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    with LlamaCppServer(gguf_path, n_ctx=n_ctx) as llama:
        lap("load_llamacpp")
        # (a) tokenization and chat template
        strings = list(texts) + list(PROBES)
        report.strings_tokenized = len(strings)
        llama_prompts = []
        for i, text in enumerate(strings):
            hf = tokenizer(text, add_special_tokens=False)["input_ids"]
            ours = llama.tokenize(text)
            if i < len(texts):
                llama_prompts.append(ours)
            if ours != hf:
                report.token_mismatches.append({"text": text, "hf": hf, "other": ours})
            theirs = reader_tokenizer(text, add_special_tokens=False)["input_ids"]
            if theirs != hf:
                report.reader_token_mismatches.append({"text": text, "hf": hf, "other": theirs})
        for i, (prompt, text) in enumerate(zip(prompts, texts)):
            rendered = llama.apply_template([{"role": "user", "content": formatting.user_message(prompt, None)}])
            if rendered != text:
                report.template_mismatches.append({"prompt": i, "hf": text, "llamacpp": rendered})
        lap("tokenize")

        # (b) greedy decoding by the three readers
        continuations, ref_logprobs = [], []
        for i, (hf_ids, llama_ids) in enumerate(zip(hf_prompts, llama_prompts)):
            ref = _greedy_hf(model, hf_ids, max_new_tokens, stops, pad_id)
            with torch.no_grad():  # the merged model's distribution at each position of its own output
                logits = model(torch.tensor([hf_ids + ref])).logits[0, len(hf_ids) - 1:len(hf_ids) + len(ref) - 1]
            lp = torch.log_softmax(logits.float(), dim=-1)
            continuations.append(ref)
            ref_logprobs.append(lp)
            outputs = {
                "llama.cpp": _until_stop(llama.generate(llama_ids, max_new_tokens), stops),
                "transformers-from-GGUF": _greedy_hf(reader, hf_ids, max_new_tokens, stops, pad_id),
            }
            for name, got in outputs.items():
                if got == ref:
                    continue
                at = _first_diff(ref, got)
                other = got[at] if at < len(got) else None
                if at >= len(ref):  # cannot happen with a shared stop set; kept safe for odd EOG tokens
                    other = None
                report.divergences.append({
                    "reader": name, "prompt": i, "position": at,
                    "hf": tokenizer.decode(ref[at:at + 1]) or "<end>", "other": "<end>" if other is None else tokenizer.decode([other]),
                    # how far the merged model preferred its token over the other reader's: a near-tie
                    # flips under any change of arithmetic (F16 activations, another summation order)
                    "hf_margin": None if other is None else round(float(lp[at, ref[at]] - lp[at, other]), 5),
                    "hf_text": tokenizer.decode(ref), "other_text": tokenizer.decode(got)})
        n = max(1, len(prompts))
        report.greedy_exact_llamacpp = 1 - sum(d["reader"] == "llama.cpp" for d in report.divergences) / n
        report.greedy_exact_reader = 1 - sum(d["reader"] != "llama.cpp" for d in report.divergences) / n
        lap("greedy")

        # (c) llama.cpp's distribution along the merged model's greedy continuation
        diffs, overlaps, confident, agree = [], [], 0, 0
        n_vocab = model.config.vocab_size
        filler = tokenizer("a", add_special_tokens=False)["input_ids"][0]
        for hf_ids, cont, hf_logprobs in zip(hf_prompts, continuations, ref_logprobs):
            seq = hf_ids + cont
            for t, token in enumerate(cont):
                step = llama.next_logprobs(seq[:len(hf_ids) + t], max(top_k, 20), filler)
                if token not in dict(step):  # further down llama.cpp's list: ask for more of it
                    step = llama.next_logprobs(seq[:len(hf_ids) + t], min(n_vocab, _LONG_LIST), filler)
                got = dict(step)
                if token not in got:
                    # Below all of them: its logprob is at most the last one's, so the difference
                    # counted from that is a lower bound (only a badly broken file gets here).
                    report.beyond_list += 1
                ref = hf_logprobs[t]
                diffs.append(abs(got.get(token, step[-1][1]) - float(ref[token])))
                ref_top = torch.topk(ref, max(top_k, 2))
                ref_ids = ref_top.indices.tolist()
                overlaps.append(len(set(ref_ids[:top_k]) & {i for i, _ in step[:top_k]}) / top_k)
                if float(ref_top.values[0] - ref_top.values[1]) > margin:
                    confident += 1
                    agree += step[0][0] == ref_ids[0]
        report.positions = len(diffs)
        if diffs:
            report.mean_logprob_diff = sum(diffs) / len(diffs)
            report.max_logprob_diff = max(diffs)
            report.topk_overlap = sum(overlaps) / len(overlaps)
        report.confident_positions = confident
        report.confident_agreement = agree / confident if confident else None
        lap("logprobs")
    return report
