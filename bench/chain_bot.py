"""Benchmark app: a chain of 10 no-op transitions, A0 -> A1 -> ... -> A10.

``step0`` consumes the ``A0`` marker a client adds and outputs ``A1``; ``step1`` consumes that and
outputs ``A2``; and so on to ``step9``, which outputs ``A10``. Each step does no work, so what a chain
costs is petribus's own: ten claims, starts and completions appended to the log one after another.
``bench/bench_chain.py`` times it.
"""

from pydantic import BaseModel, create_model

from petribus import Bot, BotLocation

STEPS = 10

# A0 .. A10; each carries the step that made it, so a marker is never empty.
MODELS: list[type[BaseModel]] = [create_model(f"A{i}", step=(int, ...)) for i in range(STEPS + 1)]

bot = Bot(
    name="chain",
    locations=[BotLocation(marker=m, expose=i == 0) for i, m in enumerate(MODELS)],
    description=f"A chain of {STEPS} no-op steps.",
)


def _step(i: int):
    source, target = MODELS[i], MODELS[i + 1]

    def step(inputs):
        return {target: [target(step=inputs[source][0].step + 1)]}

    return step


for _i in range(STEPS):
    bot.transition(_step(_i), inputs={MODELS[_i]: 1}, outputs=[MODELS[_i + 1]], name=f"step{_i}",
                   description=f"A{_i} -> A{_i + 1}, nothing else.")
