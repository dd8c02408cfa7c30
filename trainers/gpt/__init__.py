"""The reference GPT: model.py (GPT + seed-record options), muon.py, train.py (TrainConfig, train()), presets.py."""
