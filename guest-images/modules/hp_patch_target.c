// SPDX-License-Identifier: GPL-2.0
/* hyperpatch test livepatch: hp_target_message() says "patched",
 * hp_bench_target() does the same work as the original (for per-call cost). */
#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/livepatch.h>

static const char *livepatch_hp_target_message(void)
{
	return "patched";
}

static int livepatch_hp_bench_target(int x)
{
	barrier();
	return x + 1;
}

static struct klp_func funcs[] = {
	{ .old_name = "hp_target_message", .new_func = livepatch_hp_target_message, },
	{ .old_name = "hp_bench_target", .new_func = livepatch_hp_bench_target, },
	{ }
};

static struct klp_object objs[] = {
	{ .name = "hp_target", .funcs = funcs, },
	{ }
};

static struct klp_patch patch = {
	.mod = THIS_MODULE,
	.objs = objs,
};

static int livepatch_init(void)
{
	return klp_enable_patch(&patch);
}

static void livepatch_exit(void)
{
}

module_init(livepatch_init);
module_exit(livepatch_exit);
MODULE_LICENSE("GPL");
MODULE_INFO(livepatch, "Y");
