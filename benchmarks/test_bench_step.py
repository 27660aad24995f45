"""``optimizer.step()`` of every optimizer setting in ``fused_optim.bench``.

The cases are the records' ``bench`` settings (see conftest.py for lists,
dtypes and sizes), so an optimizer added to the registry is benchmarked here
with no edit.
"""


def test_step(bench_step):
    bench_step()
