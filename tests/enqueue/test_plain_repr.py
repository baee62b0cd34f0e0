"""``plain_repr`` writes exactly what Celery's ``saferepr`` writes, or gives up."""
from __future__ import annotations

import random
import string

from celery.utils.saferepr import saferepr

from celery_sqlbackend.plain_repr import plain_repr

_ALPHABET = string.printable + "éßü\u2028\x00'\"\\ "


def _scalar(rnd: random.Random):
    kind = rnd.randrange(7)
    if kind == 0:
        return rnd.randrange(-10 ** rnd.randrange(1, 30), 10 ** rnd.randrange(1, 30))
    if kind == 1:
        return rnd.random() * 10 ** rnd.randrange(-5, 20)
    if kind == 2:
        return rnd.choice([True, False])
    if kind == 3:
        return None
    return "".join(rnd.choice(_ALPHABET) for _ in range(rnd.randrange(0, 40)))


def test_plain_repr_agrees_with_saferepr_on_random_flat_arguments():
    rnd = random.Random(20261202)
    written = 0
    for _ in range(30_000):
        size = rnd.randrange(0, 6)
        shape = rnd.randrange(3)
        if shape == 0:
            value = tuple(_scalar(rnd) for _ in range(size))
        elif shape == 1:
            value = [_scalar(rnd) for _ in range(size)]
        else:
            value = {(_scalar(rnd) if rnd.random() < 0.3 else f"k{i}"): _scalar(rnd) for i in range(size)}
        maxlen = rnd.choice([None, 1024, 64, 20, 10, 3])
        text = plain_repr(value, maxlen)
        if text is not None:
            written += 1
            assert text == saferepr(value, maxlen), (value, maxlen)
    assert written > 15_000      # (most of them are simple enough to be written, not given up)


def test_plain_repr_gives_up_on_what_it_does_not_write():
    assert plain_repr(([1],), None) is None                 # nested
    assert plain_repr((b"bytes",), None) is None            # bytes
    assert plain_repr(("x" * 50,), 20) is None              # longer than maxlen: saferepr cuts it
    assert plain_repr("a string", None) is None             # not a tuple, list or dict

    class Number(int):
        pass

    assert plain_repr((Number(3),), None) is None           # a subclass may have its own repr
    assert plain_repr((1,), None) == "(1,)" and plain_repr((), None) == "()" and plain_repr({}, None) == "{}"
