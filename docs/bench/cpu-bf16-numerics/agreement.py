from trimode.llm import LLM
from trimode.sampling_params import SamplingParams
from trimode.bench.suites import task_suite
suite = task_suite(200)
msgs = [[{"role": r, "content": c} for r, c in p.messages] for p in suite]
outs = {}
for d in ("float32", "bfloat16"):
    llm = LLM(dtype=d, compile=False)
    outs[d] = {m: [o.token_ids for o in llm.chat(msgs, SamplingParams(mode=m, max_tokens=48, temperature=0))] for m in ("ar", "selfspec", "diffusion")}
for m in ("ar", "selfspec", "diffusion"):
    a, b = outs["float32"][m], outs["bfloat16"][m]
    same = sum(x == y for x, y in zip(a, b))
    prefix = sum(next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y))) for x, y in zip(a, b))
    total = sum(len(x) for x in a)
    print(f"{m}: {same}/{len(a)} outputs identical; {prefix}/{total} fp32 tokens before the first difference")
print("selfspec == ar within bf16:", outs["bfloat16"]["selfspec"] == outs["bfloat16"]["ar"])
