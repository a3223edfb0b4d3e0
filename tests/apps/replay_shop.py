"""Test app for the replay check: a fan-out, joins, a retried and a failed firing, a guard and a confirm.

``make_bot`` builds it; ``replay_shop_changed.py`` builds changed versions of it (a stricter guard, a
renamed transition, a marker field made required) whose replay of the golden log must differ.
"""

from pathlib import Path

from pydantic import BaseModel

from petribus import Bot, BotLocation


class Order(BaseModel):
    id: int
    items: int


class Item(BaseModel):
    order: int
    i: int


class Packed(BaseModel):
    order: int
    i: int


class Parcel(BaseModel):
    order: int
    count: int


class Label(BaseModel):
    order: int
    carrier: str = "post"


class Shipped(BaseModel):
    order: int
    attempts: int = 1


class Flaky(BaseModel):
    counter: str  # a file that counts attempts across worker processes
    fail_times: int


class Refund(BaseModel):
    amount: int


class Refunded(BaseModel):
    amount: int


def make_bot(*, refund_limit: int = 100, box_name: str = "box", label: type[BaseModel] = Label) -> Bot:
    shop = Bot(
        name="shop",
        locations=[BotLocation(marker=m) for m in (Order, Item, Packed, Parcel, label, Shipped, Flaky, Refund,
                                                   Refunded)],
        description="Splits orders into items, packs and boxes them, ships; refunds small amounts if asked.",
    )

    @shop.transition(inputs={Order: 1}, outputs=[Item], description="Splits an order into its items.")
    def split(inputs):
        order = inputs[Order][0]
        return {Item: [Item(order=order.id, i=i) for i in range(order.items)]}

    @shop.transition(inputs={Item: 1}, outputs=[Packed], description="Packs one item.")
    async def pack(inputs):
        item = inputs[Item][0]
        return {Packed: [Packed(order=item.order, i=item.i)]}

    @shop.transition(inputs={Packed: 3}, outputs=[Parcel], name=box_name, description="Boxes three items.")
    def box(inputs):
        packed = inputs[Packed]
        return {Parcel: [Parcel(order=packed[0].order, count=len(packed))]}

    @shop.transition(inputs={Parcel: 1, label: 1}, outputs=[Shipped], description="Ships a labelled parcel.")
    def ship(inputs):
        return {Shipped: [Shipped(order=inputs[Parcel][0].order)]}

    @shop.transition(inputs={Flaky: 1}, outputs=[Shipped], retries=1, description="Fails its first runs.")
    def courier(inputs):
        flaky = inputs[Flaky][0]
        path = Path(flaky.counter)
        runs = int(path.read_text()) + 1 if path.exists() else 1
        path.write_text(str(runs))
        if runs <= flaky.fail_times:
            raise RuntimeError(f"courier failure {runs}")
        return {Shipped: [Shipped(order=0, attempts=runs)]}

    @shop.transition(inputs={Refund: 1}, outputs=[Refunded], confirm=True, description="Refunds small amounts.",
                     when=lambda inputs: inputs[Refund][0].amount < refund_limit)
    def refund(inputs):
        return {Refunded: [Refunded(amount=inputs[Refund][0].amount)]}

    return shop


bot = make_bot()
