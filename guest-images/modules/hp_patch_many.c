// SPDX-License-Identifier: GPL-2.0
/* hyperpatch test livepatch: changes 20 functions at once (hp_f01..hp_f20
 * each return 2 instead of 1, so /proc/hp_many prints 40 instead of 20). */
#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/livepatch.h>

static int livepatch_hp_f01(void) { barrier(); return 2; }
static int livepatch_hp_f02(void) { barrier(); return 2; }
static int livepatch_hp_f03(void) { barrier(); return 2; }
static int livepatch_hp_f04(void) { barrier(); return 2; }
static int livepatch_hp_f05(void) { barrier(); return 2; }
static int livepatch_hp_f06(void) { barrier(); return 2; }
static int livepatch_hp_f07(void) { barrier(); return 2; }
static int livepatch_hp_f08(void) { barrier(); return 2; }
static int livepatch_hp_f09(void) { barrier(); return 2; }
static int livepatch_hp_f10(void) { barrier(); return 2; }
static int livepatch_hp_f11(void) { barrier(); return 2; }
static int livepatch_hp_f12(void) { barrier(); return 2; }
static int livepatch_hp_f13(void) { barrier(); return 2; }
static int livepatch_hp_f14(void) { barrier(); return 2; }
static int livepatch_hp_f15(void) { barrier(); return 2; }
static int livepatch_hp_f16(void) { barrier(); return 2; }
static int livepatch_hp_f17(void) { barrier(); return 2; }
static int livepatch_hp_f18(void) { barrier(); return 2; }
static int livepatch_hp_f19(void) { barrier(); return 2; }
static int livepatch_hp_f20(void) { barrier(); return 2; }

static struct klp_func funcs[] = {
	{ .old_name = "hp_f01", .new_func = livepatch_hp_f01, },
	{ .old_name = "hp_f02", .new_func = livepatch_hp_f02, },
	{ .old_name = "hp_f03", .new_func = livepatch_hp_f03, },
	{ .old_name = "hp_f04", .new_func = livepatch_hp_f04, },
	{ .old_name = "hp_f05", .new_func = livepatch_hp_f05, },
	{ .old_name = "hp_f06", .new_func = livepatch_hp_f06, },
	{ .old_name = "hp_f07", .new_func = livepatch_hp_f07, },
	{ .old_name = "hp_f08", .new_func = livepatch_hp_f08, },
	{ .old_name = "hp_f09", .new_func = livepatch_hp_f09, },
	{ .old_name = "hp_f10", .new_func = livepatch_hp_f10, },
	{ .old_name = "hp_f11", .new_func = livepatch_hp_f11, },
	{ .old_name = "hp_f12", .new_func = livepatch_hp_f12, },
	{ .old_name = "hp_f13", .new_func = livepatch_hp_f13, },
	{ .old_name = "hp_f14", .new_func = livepatch_hp_f14, },
	{ .old_name = "hp_f15", .new_func = livepatch_hp_f15, },
	{ .old_name = "hp_f16", .new_func = livepatch_hp_f16, },
	{ .old_name = "hp_f17", .new_func = livepatch_hp_f17, },
	{ .old_name = "hp_f18", .new_func = livepatch_hp_f18, },
	{ .old_name = "hp_f19", .new_func = livepatch_hp_f19, },
	{ .old_name = "hp_f20", .new_func = livepatch_hp_f20, },
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
