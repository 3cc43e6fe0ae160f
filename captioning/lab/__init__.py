"""The training lab: data readers, feature caches, training, SCST, distillation, matcher and
familiarity fitting, evaluation and model cards. The inference core (``captioning``) never imports it."""
