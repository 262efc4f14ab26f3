"""Using trained models: sampling responses (generate) and scoring them with a reward model (score)."""
