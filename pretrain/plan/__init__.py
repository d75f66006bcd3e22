"""The capacity planner, `pretrain plan`: what a run needs per device before it runs, and a mesh that fits.

- memory.py: one run (or stage) on one mesh of one accelerator: memory at the step's peak, step time, MFU.
- mesh_search.py: the mesh and micro-batch count that fit on N chips.
- compiled.py: the yardstick, what XLA says the real compiled step needs.
- accelerators.py: the chips planned for.

The per-family activation sizes live beside each model family (models/block_sizes.py and its
subclasses); the mesh and axis arithmetic is sharding.py's own, run on an abstract mesh.
"""
