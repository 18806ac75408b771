"""The comparison study: a grid of `drpo train` runs (methods x mismatch settings x seeds and
parameter sweeps), run resumably as separate processes (`drpo compare`) and summarized into
tables and figures (`drpo report`)."""
