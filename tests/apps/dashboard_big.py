"""Test app for the dashboard: a net of 50 transitions over 51 places (a chain with joins, a fan-out and a
cycle back to the start), to draw and to fill with a long log."""

from pydantic import BaseModel, create_model

from petribus import Bot, BotLocation

N = 50

# Step0 ... Step50: one marker model per place.
STEPS: list[type[BaseModel]] = [create_model(f"Step{i}", n=(int, ...)) for i in range(N + 1)]

bot = Bot(
    name="dashboard_big",
    locations=[BotLocation(marker=m) for m in STEPS],
    description="Fifty transitions in a chain, with joins, a fan-out and a cycle.",
)


def _make(i: int) -> None:
    # Every fifth transition joins two markers; every seventh also feeds the place two ahead; the last
    # one closes the cycle back to Step0.
    inputs = {STEPS[i]: 2 if i % 5 == 4 else 1}
    outputs = [STEPS[i + 1]] + ([STEPS[i + 2]] if i % 7 == 3 and i + 2 <= N else [])
    if i == N - 1:
        outputs.append(STEPS[0])

    def step(inputs):  # never runs in the dashboard tests: only the gateway is started
        return {}

    step.__name__ = f"step_{i:02d}"
    bot.transition(inputs=inputs, outputs=outputs, description=f"Step {i}")(step)


for _i in range(N):
    _make(_i)
