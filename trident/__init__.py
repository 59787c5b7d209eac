"""trident: shared code for the model repository, the build steps and the gateway."""
