"""`python -m audiokv_cli ...` is `audiokv ...`; launchers that run a module (torchrun -m, accelerate launch -m) need it."""

from audiokv_cli.cli import main

if __name__ == "__main__":
    main()
