"""Training for tmfast: the AR baseline and the Token Maturation objective.

    python -m train --config train/configs/ar_kjv.json [--key=value ...] [--resume]
"""
