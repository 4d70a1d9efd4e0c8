"""One subpackage per torchtitan release the objectives train under (``torchtitan_0_2``,
``torchtitan_0_3``), and what they share (``common``, which imports no torchtitan)."""
