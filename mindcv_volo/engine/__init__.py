"""Training and evaluation: options (`config`), data (`data`), device and run-time setup (`runtime`), the
compiled step (`step`), checkpoints (`checkpoints`), the loop (`loop`) and evaluation (`evaluate`)."""
