"""Changed versions of ``replay_shop``, each with one planted divergence from the golden log of it."""

from pydantic import BaseModel

from replay_shop import make_bot  # the loader puts this folder on sys.path


class Label(BaseModel):  # the same location with a new required field: the recorded labels lack it
    order: int
    carrier: str = "post"
    weight_g: int


stricter_guard = make_bot(refund_limit=55)  # the recorded refund of 60 would no longer be asked about
renamed = make_bot(box_name="bundle")  # the recorded firings of 'box' have no transition any more
required_field = make_bot(label=Label)
unchanged = make_bot()
