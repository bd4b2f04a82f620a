"""The offline API: `LLM(model=...).generate(prompts, SamplingParams(...))`, as in vLLM."""

from collections.abc import Sequence as Seq

from tqdm import tqdm

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.params import RequestOutput, SamplingParams

Prompt = str | list[int]


class LLM:
    def __init__(self, model: str | None = None, dtype: str = "auto", *, progress: bool = True, **engine_args):
        """`model`: HF folder, .gguf file, converted Orbax folder or preset name (default: SmolLM2-135M-Instruct).
        Other keyword arguments are `EngineConfig` fields (max_model_len, num_pages, tp, dp, ...).
        In a multi-host run (num_processes > 1) only process 0 generates; the others call `self.engine.follow()`."""
        self.engine = LLMEngine(EngineConfig(model=model, dtype=dtype, **engine_args), progress=progress)
        self._next_id = 0

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in the prompts' order."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        ids = []
        for prompt, p in zip(prompts, params):
            ids.append(self.engine.add_request(f"offline-{self._next_id}", prompt, p))
            self._next_id += 1
        return self._run(ids, use_tqdm)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Render each conversation with the model's chat template, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tok = self.engine.tokenizer
        prompts = [tok.apply_chat_template(c, add_generation_prompt=add_generation_prompt, tokenize=True)
                   for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="generating", disable=not use_tqdm, unit="req")
        while len(done) < len(request_ids):
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
                    bar.update()
        bar.close()
        return [done[r] for r in request_ids]
