"""The data side: corpus preparation (`prepare`) and the Grain training pipeline (`pipeline`)."""
