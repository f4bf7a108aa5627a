"""curvlab's backends and integrations, one module per package (installed as
``curvlab.adapters``; the import name ``adapters`` belongs to another PyPI project).

- :mod:`curvlab.adapters.autograd`: exact products by autograd and torch.func (the
  reference backend; no extra dependency).
- :mod:`curvlab.adapters.backpack`: BackPACK's per-sample quantities, diagonals and
  Kronecker factors.
- :mod:`curvlab.adapters.pyhessian`: PyHessian's cached-graph Hessian products and its own
  algorithms.
- :mod:`curvlab.adapters.kfac`: curvlinops' KFAC/EKFAC and a damped inverse a damper drives.
- :mod:`curvlab.adapters.kfac_pytorch`: a damper as kfac-pytorch's ``damping`` schedule.
- :mod:`curvlab.adapters.asdl`: a damper driving ASDL's gradient makers.

Nothing here imports a backend package at ``import curvlab``: :func:`curvlab.estimator`
imports an adapter (and its package) when its backend is first used, and
``curvlab.backends()`` reports which are installed.
"""
