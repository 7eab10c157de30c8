"""MultimodalAmortizedLDA: a multimodal topic model with per-modality encoders and a mixture of experts.

Forward and backward passes are written explicitly against the array namespace of the inputs
(NumPy now, CuPy on GPU workers); no autodiff framework. Spec: ``specs/topic_model.md``; user guide:
``docs/topic_model.md``.
"""

from ._config import (
    TopicModelConfig,
    cell_topic_prior,
    kl_weight_schedule,
    likelihood_weights,
    logistic_normal_approximation,
    topic_feature_prior_sigma,
)
from ._loss import (
    backward_cells,
    forward_cells,
    global_draws,
    global_draws_backward,
    global_kl,
    loglik_bernoulli,
    loglik_gaussian,
    loglik_multinomial,
    loglik_nb_fixed,
    loglik_nb_learned,
    loss_and_grad,
    masked_softmax,
    moment_match,
)
from ._model import MultimodalAmortizedLDA
from ._optim import AdamWState, adamw_init, adamw_step
from ._params import (
    background_init,
    draw_cell_noise,
    draw_global_noise,
    init_bn_state,
    init_cell_omega,
    init_params,
    kmeans_decoder_init,
    make_buffers,
)
from ._train import (
    TopicFit,
    guide_eval,
    per_token_log_likelihood,
    topic_feature_dist,
    topic_proportions,
    train_serial,
)

__all__ = [
    "AdamWState",
    "MultimodalAmortizedLDA",
    "TopicFit",
    "TopicModelConfig",
    "adamw_init",
    "adamw_step",
    "backward_cells",
    "background_init",
    "cell_topic_prior",
    "draw_cell_noise",
    "draw_global_noise",
    "forward_cells",
    "global_draws",
    "global_draws_backward",
    "global_kl",
    "guide_eval",
    "init_bn_state",
    "init_cell_omega",
    "init_params",
    "kl_weight_schedule",
    "kmeans_decoder_init",
    "likelihood_weights",
    "loglik_bernoulli",
    "loglik_gaussian",
    "loglik_multinomial",
    "loglik_nb_fixed",
    "loglik_nb_learned",
    "logistic_normal_approximation",
    "loss_and_grad",
    "make_buffers",
    "masked_softmax",
    "moment_match",
    "per_token_log_likelihood",
    "topic_feature_dist",
    "topic_feature_prior_sigma",
    "topic_proportions",
    "train_serial",
]
