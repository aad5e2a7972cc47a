"""One line of help per :class:`~simulation.config.SimulationConfig` setting, by topic.

``fedrec simulate --help`` lists every setting under these topics, each as a flag named
like its run-config key (``--adapt-lr`` is ``adapt-lr``); a test keeps this table and the
config's fields the same.
"""

from __future__ import annotations

SETTINGS_HELP: dict[str, dict[str, str]] = {
    "Data and split": {
        "dataset": "Dataset name (see --dataset).",
        "data_dir": "Local copy of the dataset (see --data-dir).",
        "seed": "Seed of every split and sampler (user-level DP's training cohorts stay secret).",
        "synthetic_users": "Users of the synthetic world (1 to 100,000; users x items at "
        "most 100,000,000).",
        "synthetic_items": "Items of the synthetic world (2 to 20,000).",
        "cold_user_fraction": "Share of users held out for few-shot evaluation (0 = none).",
        "public_fraction": "Share of the other users whose data the server may pretrain on.",
    },
    "Pretraining (server side, cached)": {
        "teacher_epochs": "Teacher epoch cap (early stopping on public validation).",
        "student_epochs": "Distillation epoch cap (early stopping on public validation).",
        "teacher_id_init": "Teacher item-table start: cooccurrence or random.",
        "teacher_order": "Teacher reads histories as sequence, set, or auto (validation picks).",
        "teacher_members": "Independently seeded teachers averaged into one.",
        "teacher_prior": "Add EASE's item-item scores to the teacher, weighted on validation.",
        "text_model": "Local Hugging Face encoder directory ('' = the bundled MiniLM).",
    },
    "Federation": {
        "rounds": "Federated rounds.",
        "cohort_size": "Clients sampled per round.",
        "min_cohort": "Fewest sampled clients a round trains with (capped at the cohort); "
        "under SecAgg+ also the fewest updates whose sum is unmasked.",
        "round_timeout": "Seconds to wait for plain (non-SecAgg+) replies; 0 = all.",
        "update_clip_norm": "L2 bound of each client's whole update (0 = none fixed; with "
        "user-dp 0 or user-dp-clip).",
        "update_clip_median_multiple": "Without SecAgg+ and user-dp, and update-clip-norm 0: "
        "the server clips each round's updates to this many times their median L2 norm "
        "(0 = off, else >= 1).",
        "eval_size": "Clients sampled for federated evaluation per round (0 = none).",
        "eval_negatives": "Sampled negatives per item of the per-round federated evaluation.",
        "secagg": "Secure aggregation (SecAgg+).",
        "secagg_num_shares": "SecAgg+ shares per client (its neighbours): an odd "
        "count, or a fraction of the cohort.",
        "secagg_reconstruction_threshold": "SecAgg+ shares needed to unmask a dropout: a count, "
        "or a fraction of the shares; a strict majority of them (2 x threshold > num-shares).",
        "secagg_clipping_range": "SecAgg+ quantization clips each update value to this range.",
        "secagg_timeout": "Seconds a SecAgg+ stage waits for the clients (0 = no timeout).",
        "secagg_quantization_range": "Levels each clipped update value is quantized to.",
        "secagg_modulus_range": "Modulus of the masked sums (a power of two, <= 2**32).",
        "secagg_max_weight": "Largest example count a client may weigh its update by "
        "(without DP: under DP every client weighs 1, and it is 1).",
        "server_optimizer": "The server's optimiser: avg (FedAvg) or adam (FedAdam).",
        "server_lr": "The server optimiser's learning rate.",
        "server_beta1": "FedAdam's first-moment decay.",
        "server_beta2": "FedAdam's second-moment decay.",
        "server_tau": "FedAdam's adaptivity (epsilon) term.",
    },
    "Client training and record-level DP": {
        "dp": "Record-level DP-SGD (Opacus) on clients.",
        "noise_multiplier": "DP-SGD noise multiplier.",
        "max_grad_norm": "DP-SGD per-example gradient clip (L2).",
        "epsilon_budget": "A client's record-level epsilon budget; past it, it declines.",
        "delta": "Record-level delta.",
        "max_round_steps": "Most DP-SGD steps a client takes in one round (local-epochs x "
        "its batches); a round asking more is declined.",
        "max_round_epsilon": "Most record-level epsilon a client spends in one round (as its "
        "ledger predicts); a round asking more is declined.",
        "noise_shares": "> 1: each client adds 1/sqrt(m) of the DP noise (1/m of its variance) "
        "to the SecAgg+ sum.",
        "local_epochs": "Local epochs per round.",
        "batch_size": "Local (expected Poisson) batch size.",
        "lr": "Local learning rate.",
        "momentum": "Momentum of the clients' local SGD.",
        "max_examples": "Most recent next-item examples a client trains on.",
        "personal_steps": "Adam steps refitting a device's personal adapter.",
        "personal_lr": "Learning rate of the personal adapter.",
        "exclude_seen": "Leave the window's own items out of the next-item softmax.",
        "meta_learning": "Reptile: learn the personal adapter's start federatedly.",
    },
    "User-level DP (server noise)": {
        "user_dp": "User-level DP-FedAvg: clients clip updates, the server adds noise.",
        "user_dp_noise_multiplier": "Noise multiplier of the server's Gaussian noise.",
        "user_dp_clip": "L2 bound of each client's whole update.",
        "user_dp_delta": "User-level delta (0 = 1 / number of clients).",
        "user_dp_epsilon_budget": "User-level epsilon the run stops before exceeding (0 = none).",
    },
    "Few-shot": {
        "shots": "Support sizes K of the cold-start evaluation (repeat the flag).",
        "adapt_steps": "Local steps adapting to a new user's K interactions (0 = none).",
        "adapt_lr": "Learning rate of those steps.",
    },
    "Runtime": {
        "backend": "ray (Flower's simulation engine) or inprocess (threads).",
        "num_cpus_per_client": "CPUs Ray reserves per virtual client.",
        "num_gpus_per_client": "GPU share per virtual client (e.g. 0.1 shares one GPU).",
        "ray_address": "Attach to a running Ray cluster (HOST:PORT, ray://HOST:PORT, auto).",
        "device": "Where clients train and the server pretrains: auto, cpu, cuda or cuda:N.",
        "num_threads": "Torch threads a client's training uses.",
    },
    "Output": {
        "run_dir": "Parent folder of run directories.",
        "name": "Run directory name (default: dataset-time).",
        "cache_dir": "Pretraining and text cache ('' = $FEDREC_CACHE_DIR or ~/.cache/fedrec).",
        "publish_each_round": "Publish an int8 ONNX model after every round, not only the last.",
        "prune_sparsity": "Magnitude-prune every published model to this sparsity (0 = none).",
        "checkpoint_keep": "Newest checkpoints kept in the run directory.",
        "progress": "Live progress display on stderr.",
        "export_recs": "Models whose top 100 per user is written (recs.csv for student-int8, "
        "recs-MODEL.csv for the others, and recs[-MODEL]-fewshot-kK.csv per few-shot K for "
        "those with few-shot figures; 'all'; 'none'; repeat the flag).",
    },
}
