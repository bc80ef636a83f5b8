// SPDX-License-Identifier: GPL-2.0
/* hyperpatch test livepatch: changes hp_sleep_wait(), which a guest task can
 * be made to sleep inside (a read of /proc/hp_sleep): the safe-point tests;
 * and hp_block_wait(), where many kernel threads can sleep at once
 * ("block N" to /proc/hp_racer): per-task transitions at scale. */
#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/livepatch.h>

static int livepatch_hp_sleep_wait(void)
{
	return 7;
}

static int livepatch_hp_block_wait(void)
{
	return 8;
}

static struct klp_func funcs[] = {
	{ .old_name = "hp_sleep_wait", .new_func = livepatch_hp_sleep_wait, },
	{ .old_name = "hp_block_wait", .new_func = livepatch_hp_block_wait, },
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
