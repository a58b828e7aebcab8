"""Stage 5, predict: name regions of new images (the Predictor, "name everything", pictures;
``python -m regionspot_pl.predict``)."""
