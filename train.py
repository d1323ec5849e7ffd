"""Train, evaluate and compare handgrad MLPs on CIFAR-10 from the command line.

    python train.py                                     # the main job: fit the reference experiment, then test
                                                        # the best checkpoint (by val accuracy) and print a summary
    python train.py --model.lr 0.05 --trainer.max_epochs 5   # the main job with overrides
    python train.py fit --config configs/airplane_bird.yaml [--trainer.accelerator cpu ...]
    python train.py fit --ckpt_path lightning_logs/version_0/checkpoints/last.ckpt      # resume
    python train.py validate|test|predict --ckpt_path PATH.ckpt
    python train.py fit --print_config                  # every option with its value
    python train.py sweep --config configs/grid.yaml    # model selection over SGD settings, all members batched
    python train.py verify                              # check the hand-written gradients and SGD step

The commands are listed in handgrad/cli.py (also `python -m handgrad ...`); the docs/ folder explains each.
"""

from handgrad.cli import main

if __name__ == "__main__":
    main()
