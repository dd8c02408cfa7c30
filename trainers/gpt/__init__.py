"""The reference GPT trainer: muon.py, qat.py, train.py (TrainConfig, train()), presets.py; the model is qpack.models.gpt."""
