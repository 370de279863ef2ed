"""``tapo plan --recipe R --nodes N --gpus-per-node G``: per-GPU memory of a layout; refuses what cannot fit."""


def add_parser(sub):
    plan = sub.add_parser("plan", help="per-GPU memory and layout check of a recipe")
    plan.add_argument("--recipe", required=True, help="packaged recipe name or YAML path")
    plan.add_argument("--nodes", type=int, required=True)
    plan.add_argument("--gpus-per-node", type=int, required=True)
    plan.add_argument("--preset", default="auto", help="h100_1x8, h100_4x8, none, or auto (matching the layout)")
    plan.add_argument("overrides", nargs="*")
    return plan


def run(args) -> None:
    from tapo_megatron.launch.plan import check_plan, make_plan
    from tapo_megatron.models.qwen3 import shape_from_config
    from tapo_megatron.recipes import load_recipe, preset_for

    preset = preset_for(args.nodes, args.gpus_per_node) if args.preset == "auto" else (
        None if args.preset == "none" else args.preset)
    cfg = load_recipe(args.recipe, preset, args.overrides)
    plan = make_plan(cfg, shape_from_config(cfg.model), args.nodes, args.gpus_per_node)
    print(f"recipe: {args.recipe}   preset: {preset or 'none'}")
    print(plan.table())
    check_plan(plan)  # raises PlanError (a ConfigError) naming why it does not fit
    print("fits: yes")
